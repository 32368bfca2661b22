package nodeinstall

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// UninstallOptions are an uninstall's settings: the rest was recorded by the install.
type UninstallOptions struct {
	Roots
	NoRestart bool
	Systemctl []string
	Prog      string
	Out, Err  io.Writer
}

// ErrIncomplete is an uninstall that could not restore everything: run it again.
var ErrIncomplete = errors.New("the uninstall is not finished: run it again")

// Uninstall puts every file the install changed back as it was, byte for byte, removes
// what it added and the directories it made (when empty), and stops cove-node. A file
// somebody edited since the install keeps those edits: only what the install added goes.
func Uninstall(ctx context.Context, u *UninstallOptions) error {
	o := &Options{Roots: u.Roots, NoRestart: u.NoRestart, Systemctl: u.Systemctl, Prog: u.Prog, Out: u.Out, Err: u.Err}
	if err := o.validateCommon("cove-node uninstall"); err != nil {
		return err
	}
	t := newTx(o.Roots, o.say)
	entries, err := t.readManifest()
	if err != nil {
		return err
	}
	if entries == nil {
		if _, err := os.Stat(t.backupFile(manifestName)); err != nil {
			o.say("nothing to uninstall: no %s%s", filepath.Join(BackupDir, manifestName), o.rootFlags())
			return nil
		}
	}
	socketUnit, dropin := false, ""
	for _, e := range entries {
		socketUnit = socketUnit || e.role == "socket"
		if e.role == "dropin" && dropin == "" {
			dropin = e.path
		}
	}
	if !o.NoRestart {
		if err := o.systemctl(ctx, "disable", "--now", UnitName); err != nil {
			o.warn("%v", err)
		}
		if socketUnit {
			if err := o.systemctl(ctx, "disable", "--now", SocketUnitName); err != nil {
				o.warn("%v", err)
			}
		}
	}
	hashes := t.readHashes()
	restartCtd, left := false, false
	for i := len(entries) - 1; i >= 0; i-- {
		e := entries[i]
		if e.kind == "dir" {
			continue
		}
		hp, b := t.File(e.path), t.backupFile("files"+e.path)
		if e.role == "rootconfig" || e.role == "dropin" {
			restartCtd = true
		}
		cur, exists := fileHash(hp)
		if exists && cur != hashes[e.path] && (e.role == "rootconfig" || e.role == "hosts") && !(e.kind == "mod" && same(b, hp)) {
			// Edited since the install: take out only what the install added.
			if err := o.undoEdited(e, hp, dropin); err != nil {
				return fmt.Errorf("%s: %v: %w", hp, err, ErrIncomplete)
			}
			continue
		}
		switch {
		case e.kind == "new":
			if exists {
				if err := os.Remove(hp); err != nil {
					return fmt.Errorf("%v: %w", err, ErrIncomplete)
				}
				o.say("removed: %s", e.path)
			}
		case fileExists(b):
			if !same(b, hp) {
				if err := copyFile(b, hp); err != nil {
					return fmt.Errorf("%v: %w", err, ErrIncomplete)
				}
				o.say("restored: %s", e.path)
			} else {
				st, _ := os.Stat(b)
				os.Chtimes(hp, st.ModTime(), st.ModTime())
			}
		default:
			o.warn("no backup of %s in %s: left as it is", e.path, filepath.Join(BackupDir, "files"))
			left = true
		}
	}
	if left {
		return fmt.Errorf("uninstall incomplete: see the warnings above: %w", ErrIncomplete)
	}
	if err := os.RemoveAll(t.File(BackupDir)); err != nil {
		return fmt.Errorf("%v: %w", err, ErrIncomplete)
	}
	for i := len(entries) - 1; i >= 0; i-- {
		e := entries[i]
		if e.kind != "dir" {
			continue
		}
		hp := t.File(e.path)
		if st, err := os.Stat(hp); err != nil || !st.IsDir() {
			continue
		}
		if os.Remove(hp) == nil {
			o.say("removed directory: %s", e.path)
		} else {
			o.say("kept directory %s: not empty", e.path)
		}
	}
	if err := o.uninstallServices(ctx, socketUnit, restartCtd); err != nil {
		return err
	}
	o.say("uninstalled cove-node")
	return nil
}

// undoEdited takes out of an edited hosts.toml or root config only what the install added.
func (o *Options) undoEdited(e entry, hp, dropin string) error {
	cur, err := os.ReadFile(hp)
	if err != nil {
		return err
	}
	var out []byte
	if e.role == "hosts" {
		if out, err = StripBlock(cur); err != nil {
			return err
		}
	} else if out, _, err = RemoveImport(cur, o.Conf(dropin)); err != nil {
		return err
	}
	if e.kind == "new" && len(out) == 0 {
		if err := os.Remove(hp); err != nil {
			return err
		}
		o.say("removed: %s", e.path)
		return nil
	}
	if string(out) != string(cur) {
		st, err := os.Stat(hp)
		if err != nil {
			return err
		}
		if err := os.WriteFile(hp, out, st.Mode().Perm()); err != nil {
			return err
		}
		o.warn("%s changed since the install: kept those changes and removed only what the install added; check it", e.path)
	}
	return nil
}

func (o *Options) uninstallServices(ctx context.Context, socketUnit, restartCtd bool) error {
	if o.NoRestart {
		if o.sandboxed() {
			o.say("--no-restart: no service touched (--root-dir %s is not this machine's root)", o.RootDir)
			return nil
		}
		units := UnitName
		if socketUnit {
			units += " " + SocketUnitName
		}
		steps := "systemctl disable --now " + units + " && systemctl daemon-reload"
		if restartCtd {
			steps += " && systemctl restart containerd"
			o.say("containerd must be restarted to read its restored configuration")
		}
		o.say("--no-restart: no service touched. To finish: %s", steps)
		return nil
	}
	if err := o.systemctl(ctx, "daemon-reload"); err != nil {
		o.warn("%v", err)
	}
	if restartCtd {
		if err := o.systemctl(ctx, "restart", "containerd"); err != nil {
			return fmt.Errorf("restarting containerd failed (journalctl -u containerd): %v", err)
		}
		o.say("restarted containerd")
	}
	return nil
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
