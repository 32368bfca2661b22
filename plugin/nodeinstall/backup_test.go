package nodeinstall

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// put backs a file up once, keeps its mode, records new files and made directories in
// the manifest, and rollback undoes all of it.
func TestTxPutBackupRollback(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "etc/a.conf"), "original\n")
	os.Chmod(filepath.Join(root, "etc/a.conf"), 0o600)
	before := tree(t, root)
	var said []string
	tx := newTx(Roots{RootDir: root}, func(f string, a ...any) { said = append(said, f) })
	if err := tx.makeDirs(BackupDir); err != nil {
		t.Fatal(err)
	}
	for _, data := range []string{"first\n", "second\n"} {
		if err := tx.put("conf", "/etc/a.conf", []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.put("unit", "/etc/new/b.conf", []byte("b\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(root, "etc/a.conf")); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want the file's own 0600", st.Mode().Perm())
	}
	if b, _ := os.ReadFile(filepath.Join(root, BackupDir, "files/etc/a.conf")); string(b) != "original\n" {
		t.Errorf("backup holds %q, want the original", b)
	}
	es, err := tx.readManifest()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range es {
		got = append(got, e.kind+" "+e.path)
	}
	want := []string{"dir /var", "dir /var/lib", "dir /var/lib/cove-node", "dir /var/lib/cove-node/install-backup",
		"mod /etc/a.conf", "dir /etc/new", "new /etc/new/b.conf"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("manifest %q, want %q", got, want)
	}
	if err := tx.put("conf", "/etc/a.conf", []byte("second\n"), 0o644); err != nil || !strings.HasPrefix(said[len(said)-1], "unchanged") {
		t.Errorf("putting the same bytes again: %v, said %q", err, said[len(said)-1])
	}
	tx.rollback()
	if !reflect.DeepEqual(before, tree(t, root)) {
		t.Errorf("after the rollback: %v, want %v", tree(t, root), before)
	}
}

// put refuses a symbolic link and a directory where a file goes.
func TestTxPutRefusesLinksAndDirectories(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "etc/real.conf"), "x\n")
	os.Symlink("real.conf", filepath.Join(root, "etc/link.conf"))
	os.MkdirAll(filepath.Join(root, "etc/dir.conf"), 0o755)
	tx := newTx(Roots{RootDir: root}, func(string, ...any) {})
	if err := tx.put("c", "/etc/link.conf", []byte("y"), 0o644); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("link: %v", err)
	}
	if err := tx.put("c", "/etc/dir.conf", []byte("y"), 0o644); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/real.conf")); string(b) != "x\n" {
		t.Errorf("the link's target changed: %q", b)
	}
}
