package nodeinstall

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The backup directory (under BackupDir) remembers what the install changed, for the
// uninstall; node.sh kept the same layout, so either can undo the other's install:
//
//	manifest          one line per node path: KIND \t ROLE \t PATH, in the order of the
//	                  first change; KIND dir (made by the install), new (absent before) or
//	                  mod (its original is under files/)
//	files/PATH        the original of every mod path
//	installed.sha256  SHA256 \t PATH of every file as the last install left it, so the
//	                  uninstall can tell a file somebody edited since
const (
	manifestName = "manifest"
	hashesName   = "installed.sha256"
)

// entry is one manifest line.
type entry struct{ kind, role, path string }

// saved is a host file's state before this run's first change to it, for the rollback.
type saved struct {
	path   string
	exists bool
	data   []byte
	mode   fs.FileMode
	mtime  time.Time
}

// tx is one run's changes to the node: every change goes through it, backed up once for
// the uninstall (the manifest) and remembered for this run's rollback.
type tx struct {
	Roots
	say     func(format string, a ...any)
	saved   []saved
	seen    map[string]bool
	dirs    []string // host directories this run made, in order
	changed map[string]bool
}

func newTx(r Roots, say func(string, ...any)) *tx {
	return &tx{Roots: r, say: say, seen: map[string]bool{}, changed: map[string]bool{}}
}

func (t *tx) backupFile(name string) string { return t.File(filepath.Join(BackupDir, name)) }

// save remembers host path hp before this run's first change to it.
func (t *tx) save(hp string) error {
	if t.seen[hp] {
		return nil
	}
	s := saved{path: hp}
	st, err := os.Lstat(hp)
	switch {
	case err == nil:
		if s.data, err = os.ReadFile(hp); err != nil {
			return err
		}
		s.exists, s.mode, s.mtime = true, st.Mode().Perm(), st.ModTime()
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	t.seen[hp] = true
	t.saved = append(t.saved, s)
	return nil
}

// ran says whether this run changed anything.
func (t *tx) ran() bool { return len(t.saved) > 0 || len(t.dirs) > 0 }

// rollback undoes this run: files back as they were, directories it made removed.
func (t *tx) rollback() {
	for i := len(t.saved) - 1; i >= 0; i-- {
		s := t.saved[i]
		if !s.exists {
			os.Remove(s.path)
			continue
		}
		os.WriteFile(s.path, s.data, s.mode)
		os.Chmod(s.path, s.mode)
		os.Chtimes(s.path, s.mtime, s.mtime)
	}
	for i := len(t.dirs) - 1; i >= 0; i-- {
		os.Remove(t.dirs[i])
	}
	t.saved, t.dirs, t.seen = nil, nil, map[string]bool{}
}

// readManifest returns the manifest's entries (none when there is no manifest).
func (t *tx) readManifest() ([]entry, error) {
	b, err := os.ReadFile(t.backupFile(manifestName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []entry
	for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if line == "" {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) != 3 || (f[0] != "dir" && f[0] != "new" && f[0] != "mod") || !strings.HasPrefix(f[2], "/") {
			return nil, fmt.Errorf("%s: unreadable line %q", filepath.Join(BackupDir, manifestName), line)
		}
		out = append(out, entry{f[0], f[1], f[2]})
	}
	return out, nil
}

// inManifest returns node path p's manifest entry.
func (t *tx) inManifest(p string) (entry, bool, error) {
	es, err := t.readManifest()
	for _, e := range es {
		if e.path == p {
			return e, true, err
		}
	}
	return entry{}, false, err
}

// record adds a manifest line (once).
func (t *tx) record(e entry) error {
	m := t.backupFile(manifestName)
	es, err := t.readManifest()
	if err != nil {
		return err
	}
	for _, x := range es {
		if x == e {
			return nil
		}
	}
	if err := t.save(m); err != nil {
		return err
	}
	f, err := os.OpenFile(m, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(f, "%s\t%s\t%s\n", e.kind, e.role, e.path)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// mkdirRun makes host directory d and its missing parents, for this run only.
func (t *tx) mkdirRun(d string) error {
	var todo []string
	for {
		st, err := os.Lstat(d)
		if err == nil {
			if !st.IsDir() {
				return fmt.Errorf("%s exists and is not a directory", d)
			}
			break
		}
		todo = append([]string{d}, todo...)
		d = filepath.Dir(d)
	}
	for _, d := range todo {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		t.dirs = append(t.dirs, d)
	}
	return nil
}

// makeDirs makes node directory d and its missing parents, recorded for the uninstall.
func (t *tx) makeDirs(d string) error {
	var todo []string
	for {
		st, err := os.Lstat(t.File(d))
		if err == nil {
			if !st.IsDir() {
				return fmt.Errorf("%s exists and is not a directory", t.File(d))
			}
			break
		}
		todo = append([]string{d}, todo...)
		d = filepath.Dir(d)
	}
	for _, d := range todo {
		if err := os.Mkdir(t.File(d), 0o755); err != nil {
			return err
		}
		os.Chmod(t.File(d), 0o755) // whatever the umask
		t.dirs = append(t.dirs, t.File(d))
	}
	for _, d := range todo {
		if err := t.record(entry{"dir", "dir", d}); err != nil {
			return err
		}
	}
	return nil
}

// recordOriginal backs node path p up before the install's first change to it.
func (t *tx) recordOriginal(role, p string) error {
	if _, ok, err := t.inManifest(p); ok || err != nil {
		return err
	}
	hp := t.File(p)
	if _, err := os.Lstat(hp); errors.Is(err, fs.ErrNotExist) {
		return t.record(entry{"new", role, p})
	}
	b := t.backupFile("files" + p)
	if err := t.mkdirRun(filepath.Dir(b)); err != nil {
		return err
	}
	if err := t.save(b); err != nil {
		return err
	}
	if err := copyFile(hp, b); err != nil {
		return err
	}
	if err := t.record(entry{"mod", role, p}); err != nil {
		return err
	}
	t.say("backed up %s to %s", p, filepath.Join(BackupDir, "files"+p))
	return nil
}

// put makes node path p hold exactly data. An existing file keeps its owner and mode; a
// new one gets mode.
func (t *tx) put(role, p string, data []byte, mode fs.FileMode) error {
	hp := t.File(p)
	st, err := os.Lstat(hp)
	exists := err == nil
	if exists && st.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%s is a symbolic link: pass the file it points to instead", hp)
	}
	if exists && !st.Mode().IsRegular() {
		return fmt.Errorf("%s exists and is not a regular file", hp)
	}
	if exists {
		if cur, err := os.ReadFile(hp); err == nil && bytes.Equal(cur, data) {
			t.say("unchanged: %s", p)
			return nil
		}
	}
	if err := t.makeDirs(filepath.Dir(p)); err != nil {
		return err
	}
	if err := t.recordOriginal(role, p); err != nil {
		return err
	}
	if err := t.save(hp); err != nil {
		return err
	}
	tmp := hp + ".cove-tmp." + strconv.Itoa(os.Getpid())
	if err := t.save(tmp); err != nil {
		return err
	}
	if exists {
		mode = st.Mode().Perm()
	}
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	if exists {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			os.Chown(tmp, int(sys.Uid), int(sys.Gid)) // as root; a sandbox run may not own it
		}
	}
	if err := os.Rename(tmp, hp); err != nil {
		return err
	}
	if exists {
		t.say("updated: %s", p)
	} else {
		t.say("created: %s", p)
	}
	t.changed[role] = true
	return nil
}

// takeOut removes a file an earlier run installed and this run does not want, as the
// uninstall would (removed, or its original back).
func (t *tx) takeOut(role, p, why string) error {
	hp := t.File(p)
	if _, err := os.Lstat(hp); err != nil {
		return nil
	}
	e, ok, err := t.inManifest(p)
	if !ok || err != nil {
		return err
	}
	if err := t.save(hp); err != nil {
		return err
	}
	if e.kind == "mod" {
		b := t.backupFile("files" + p)
		if same(b, hp) {
			return nil
		}
		if err := copyFile(b, hp); err != nil {
			return err
		}
		t.say("restored (%s): %s", why, p)
	} else {
		if err := os.Remove(hp); err != nil {
			return err
		}
		t.say("removed (%s): %s", why, p)
	}
	t.changed[role] = true
	return nil
}

// writeHashes records what each file the install manages holds now.
func (t *tx) writeHashes() error {
	es, err := t.readManifest()
	if err != nil {
		return err
	}
	var out bytes.Buffer
	for _, e := range es {
		if e.kind == "dir" {
			continue
		}
		if sum, ok := fileHash(t.File(e.path)); ok {
			fmt.Fprintf(&out, "%s\t%s\n", sum, e.path)
		}
	}
	h := t.backupFile(hashesName)
	if cur, err := os.ReadFile(h); err == nil && bytes.Equal(cur, out.Bytes()) {
		return nil
	}
	if err := t.save(h); err != nil {
		return err
	}
	return os.WriteFile(h, out.Bytes(), 0o600)
}

// readHashes returns the recorded hash of each path.
func (t *tx) readHashes() map[string]string {
	m := map[string]string{}
	b, _ := os.ReadFile(t.backupFile(hashesName))
	for _, line := range strings.Split(string(b), "\n") {
		if sum, p, ok := strings.Cut(line, "\t"); ok {
			m[p] = sum
		}
	}
	return m
}

func fileHash(p string) (string, bool) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", false
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:]), true
}

// same says whether files a and b both exist with the same bytes.
func same(a, b string) bool {
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}

// copyFile copies src to dst with src's mode and modification time (cp -p).
func copyFile(src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.WriteFile(dst, b, st.Mode().Perm()); err != nil {
		return err
	}
	if err := os.Chmod(dst, st.Mode().Perm()); err != nil {
		return err
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		os.Chown(dst, int(sys.Uid), int(sys.Gid))
	}
	return os.Chtimes(dst, st.ModTime(), st.ModTime())
}
