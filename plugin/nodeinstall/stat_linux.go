package nodeinstall

import (
	"io/fs"
	"syscall"
)

// statIno is a file's inode number.
func statIno(fi fs.FileInfo) (uint64, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Ino, true
}
