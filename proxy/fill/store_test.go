package fill

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
)

func TestReason(t *testing.T) {
	for errno, want := range map[syscall.Errno]string{
		syscall.ENOSPC: "no_space", syscall.EDQUOT: "quota", syscall.EIO: "io_error",
		syscall.EROFS: "read_only", syscall.EACCES: "permission", syscall.EPERM: "permission",
		syscall.EFBIG: "too_large", syscall.EINVAL: "other",
	} {
		err := fmt.Errorf("write spool: %w", &os.PathError{Op: "write", Path: "/spool/fill-1", Err: errno})
		if got := Reason(err); got != want {
			t.Errorf("Reason(%v) = %q, want %q", err, got, want)
		}
	}
	if got := Reason(errors.New("bound reached")); got != "other" {
		t.Errorf("Reason(plain error) = %q", got)
	}
}
