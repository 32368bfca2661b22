package filesystem

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/cove-oci/cove/proxy/storage"
	"github.com/cove-oci/cove/proxy/storage/storagetest"
)

func TestSuite(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storage.Driver {
		d, err := New(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return d
	})
}

func TestNewCleansLeftovers(t *testing.T) {
	root := t.TempDir()
	d, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	leftover := filepath.Join(root, "tmp", "put-123")
	if err := os.WriteFile(leftover, []byte("half a blob"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, dgst := storagetest.RandomBlob(t, 100)
	if err := d.Put(context.Background(), dgst, 100, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	d.Close() // the process ends
	d, err = New(root)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Fatalf("leftover survived restart: %v", err)
	}
	if _, err := d.Stat(context.Background(), dgst); err != nil {
		t.Fatalf("complete blob lost at restart: %v", err)
	}
}

func TestAdoptFile(t *testing.T) {
	root := t.TempDir()
	d, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	data, dgst := storagetest.RandomBlob(t, 5000)
	src := filepath.Join(root, "spool-file")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.AdoptFile(context.Background(), dgst, 4999, src); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("AdoptFile with wrong size: %v", err)
	}
	if _, err := d.Stat(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatal("wrong-size file adopted")
	}
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.AdoptFile(context.Background(), dgst, 5000, src); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(src); !os.IsNotExist(err) {
		t.Fatal("adopted file still at its old path")
	}
	if size, err := d.Stat(context.Background(), dgst); err != nil || size != 5000 {
		t.Fatalf("Stat after adopt = %d, %v", size, err)
	}
}
