package filesystem

import "syscall"

// errXDev is rename(2)'s answer across filesystems.
var errXDev = syscall.EXDEV
