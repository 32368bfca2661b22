package storagetest

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

// testWalk: every stored blob once with its size, deleted ones gone, an error from fn
// ends the walk and comes back.
func testWalk(t *testing.T, d storage.Driver) {
	ctx := context.Background()
	if err := d.Walk(ctx, func(i storage.BlobInfo) error { t.Errorf("empty store lists %v", i); return nil }); err != nil {
		t.Fatal(err)
	}
	want := map[digest.Digest]int64{}
	var gone digest.Digest
	for i, n := range []int{0, 1, 4096, 70000} {
		b, dgst := RandomBlob(t, n)
		put(t, d, b, dgst)
		want[dgst] = int64(n)
		if i == 1 {
			gone = dgst
		}
	}
	if err := d.Delete(ctx, gone); err != nil {
		t.Fatal(err)
	}
	delete(want, gone)
	got := map[digest.Digest]int64{}
	if err := d.Walk(ctx, func(i storage.BlobInfo) error {
		if _, seen := got[i.Digest]; seen {
			t.Errorf("%s listed twice", i.Digest)
		}
		got[i.Digest] = i.Size
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("walk listed %v, want %v", got, want)
	}
	for dgst, n := range want {
		if got[dgst] != n {
			t.Errorf("%s: size %d, want %d", dgst, got[dgst], n)
		}
	}
	stop := errors.New("stop")
	calls := 0
	if err := d.Walk(ctx, func(storage.BlobInfo) error { calls++; return stop }); !errors.Is(err, stop) || calls != 1 {
		t.Fatalf("walk after fn's error: %v, %d calls", err, calls)
	}
}

// testListRecords: keys under a prefix, whole segments or not, and nothing else.
func testListRecords(t *testing.T, d storage.Driver) {
	ctx := context.Background()
	keys := []string{"membership/reg.example/team/app/@sha256:aa", "membership/reg.example/team/app/@sha256:bb",
		"membership/other.example/x/@sha256:cc", "memberless/x", "tag/reg.example/team/app/@v1"}
	for _, k := range keys {
		if err := d.PutRecord(ctx, k, []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	list := func(prefix string) []string {
		var out []string
		if err := d.ListRecords(ctx, prefix, func(k string) error { out = append(out, k); return nil }); err != nil {
			t.Fatalf("ListRecords(%q): %v", prefix, err)
		}
		slices.Sort(out)
		return out
	}
	for prefix, want := range map[string][]string{
		"":                           sorted(keys),
		"membership/":                sorted(keys[:3]),
		"membership/reg.example/":    sorted(keys[:2]),
		"member":                     sorted(keys[:4]),
		"tag/reg.example/team/app/@": keys[4:],
		"nothing/":                   nil,
	} {
		if got := list(prefix); !slices.Equal(got, want) {
			t.Errorf("ListRecords(%q) = %v, want %v", prefix, got, want)
		}
	}
	if err := d.DeleteRecord(ctx, keys[0]); err != nil {
		t.Fatal(err)
	}
	if got := list("membership/reg.example/"); !slices.Equal(got, keys[1:2]) {
		t.Errorf("after a delete: %v", got)
	}
	for _, bad := range []string{"../x", "a//b", "/abs"} {
		if err := d.ListRecords(ctx, bad, func(string) error { return nil }); !errdefs.IsInvalidArgument(err) {
			t.Errorf("ListRecords(%q): %v, want invalid argument", bad, err)
		}
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
