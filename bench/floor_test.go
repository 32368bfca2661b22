package bench

// TestDiagFillFloor measures what a cold fill cannot avoid on this machine, without cove:
// a process that receives 1 GiB from a loopback socket, digests it, writes it to a spool
// file and sends it to one client, with no HTTP, no scheduling between goroutines and
// nothing else. Its CPU per GiB is a floor for BenchmarkColdFillCPU's target (1.2 s/GiB).
// Each way runs in a child process of its own (this test binary run again), so its CPU
// time (user + system, from wait4) is its own; the sender and the reading client are
// other processes.
//
//	COVE_BENCH_DIAG=1 go test -run TestDiagFillFloor -v -count=1 ./bench/
//
// COVE_FLOOR_PAUSE=10s idles that long before each way. On a VM whose balloon reports
// free pages to the host (virtio_balloon, page_reporting), memory idle for a few seconds
// is handed back, and the next writes into new page-cache pages fault on the host: the
// "write" way then costs several times what it costs right after other pages were freed.
//
// Ways (the child's role):
//   - hash: SHA-256 of 1 GiB in memory, nothing else (crypto/sha256, SHA-NI where the CPU has it).
//   - relay: socket in, socket out (read, then write), no digest, no file.
//   - write: 1 GiB written to a new file in 256 KiB writes, then fsync: no socket, no digest.
//   - copy: cove's design at its leanest: read 4 MiB rounds, digest, write the spool,
//     sendfile(2) the round from the spool to the client.
//   - splice: no copy into user space: splice(2) socket -> pipe -> spool file, the
//     digest read from the spool's pages through mmap(2), sendfile(2) to the client.

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	floorBytes = 1 << 30
	floorPiece = 256 << 10
)

func TestDiagFillFloor(t *testing.T) {
	diagOnly(t)
	sender := floorChild(t, "sender", "")
	out := bufio.NewReader(floorStdout(t, sender))
	defer sender.Process.Kill()
	senderAddr, err := out.ReadString('\n')
	if err != nil {
		t.Fatalf("sender: %v", err)
	}
	senderAddr = strings.TrimSpace(senderAddr)
	var pause time.Duration
	if v := os.Getenv("COVE_FLOOR_PAUSE"); v != "" {
		if pause, err = time.ParseDuration(v); err != nil {
			t.Fatalf("COVE_FLOOR_PAUSE: %v", err)
		}
	}
	for round := range 3 {
		for _, way := range []string{"hash", "relay", "write", "copy", "splice"} {
			time.Sleep(pause)
			cmd := floorChild(t, way, senderAddr)
			stdout := bufio.NewReader(floorStdout(t, cmd))
			addr, err := stdout.ReadString('\n')
			if err != nil {
				t.Fatalf("%s: %v", way, err)
			}
			start := time.Now()
			var got int64
			if addr = strings.TrimSpace(addr); addr != "-" {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				got, _ = io.Copy(io.Discard, c)
				c.Close()
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%s: %v", way, err)
			}
			if addr != "-" && got != floorBytes {
				t.Fatalf("%s: the client read %d bytes, want %d", way, got, floorBytes)
			}
			ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
			user, sys := time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
			t.Logf("round %d %-6s CPU %.2f s/GiB (user %.2f, system %.2f), %.2f s", round, way,
				(user + sys).Seconds(), user.Seconds(), sys.Seconds(), time.Since(start).Seconds())
		}
	}
}

func floorChild(t *testing.T, role, sender string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestDiagFillFloorChild$", "-test.v=false")
	cmd.Env = append(os.Environ(), "COVE_FLOOR_ROLE="+role, "COVE_FLOOR_SENDER="+sender, "COVE_FLOOR_DIR="+t.TempDir())
	cmd.Stderr = os.Stderr
	return cmd
}

func floorStdout(t *testing.T, cmd *exec.Cmd) io.Reader {
	t.Helper()
	r, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestDiagFillFloorChild is a child of TestDiagFillFloor; it does nothing on its own.
func TestDiagFillFloorChild(t *testing.T) {
	role := os.Getenv("COVE_FLOOR_ROLE")
	if role == "" {
		t.Skip("a child of TestDiagFillFloor")
	}
	if err := floorRole(role, os.Getenv("COVE_FLOOR_SENDER"), os.Getenv("COVE_FLOOR_DIR")); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", role, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func floorRole(role, sender, dir string) error {
	buf := make([]byte, 4<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>9)
	}
	switch role {
	case "sender": // serves floorBytes to each connection, for good
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fmt.Println(l.Addr())
		for {
			c, err := l.Accept()
			if err != nil {
				return err
			}
			go func() {
				defer c.Close()
				for sent := 0; sent < floorBytes; sent += len(buf) {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	case "write":
		fmt.Println("-")
		f, err := os.Create(filepath.Join(dir, "spool"))
		if err != nil {
			return err
		}
		defer os.Remove(f.Name()) // its pages go back to the kernel for the next way
		defer f.Close()
		for n := 0; n < floorBytes; n += floorPiece {
			if _, err := f.Write(buf[:floorPiece]); err != nil {
				return err
			}
		}
		return f.Sync()
	case "hash":
		fmt.Println("-")
		h := sha256.New()
		for n := 0; n < floorBytes; n += len(buf) {
			h.Write(buf)
		}
		_ = h.Sum(nil)
		return nil
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println(l.Addr())
	client, err := l.Accept()
	if err != nil {
		return err
	}
	defer client.Close()
	origin, err := net.Dial("tcp", sender)
	if err != nil {
		return err
	}
	defer origin.Close()
	if role == "relay" {
		_, err := io.CopyBuffer(struct{ io.Writer }{client}, struct{ io.Reader }{origin}, buf)
		return err
	}
	in, _ := origin.(*net.TCPConn).File()
	out, _ := client.(*net.TCPConn).File()
	defer in.Close()
	defer out.Close()
	// Blocking descriptors: each call below waits in the kernel, as a thread of its own would.
	unix.SetNonblock(int(in.Fd()), false)
	unix.SetNonblock(int(out.Fd()), false)
	spool, err := os.Create(filepath.Join(dir, "spool"))
	if err != nil {
		return err
	}
	defer os.Remove(spool.Name())
	defer spool.Close()
	_ = unix.Fallocate(int(spool.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, floorBytes)
	h := sha256.New()
	var off int64
	switch role {
	case "copy":
		for off < floorBytes {
			n, err := io.ReadAtLeast(in, buf, 512<<10)
			if n == 0 && err != nil {
				return err
			}
			h.Write(buf[:n])
			for at := 0; at < n; at += floorPiece { // ext4 takes 256 KiB writes best
				if _, err := spool.WriteAt(buf[at:min(at+floorPiece, n)], off+int64(at)); err != nil {
					return err
				}
			}
			if err := sendfileAll(out, spool, off, n); err != nil {
				return err
			}
			off += int64(n)
		}
	case "splice":
		if err := spool.Truncate(floorBytes); err != nil {
			return err
		}
		m, err := unix.Mmap(int(spool.Fd()), 0, floorBytes, unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			return err
		}
		defer unix.Munmap(m)
		var p [2]int
		if err := unix.Pipe(p[:]); err != nil {
			return err
		}
		defer unix.Close(p[0])
		defer unix.Close(p[1])
		unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<20)
		for off < floorBytes {
			n, err := unix.Splice(int(in.Fd()), nil, p[1], nil, floorPiece, unix.SPLICE_F_MOVE)
			if err != nil || n == 0 {
				return fmt.Errorf("splice from the socket: %d, %v", n, err)
			}
			for left, at := n, off; left > 0; {
				w, err := unix.Splice(p[0], nil, int(spool.Fd()), &at, int(left), unix.SPLICE_F_MOVE)
				if err != nil {
					return fmt.Errorf("splice to the spool: %v", err)
				}
				left -= w
			}
			h.Write(m[off : off+n])
			if err := sendfileAll(out, spool, off, int(n)); err != nil {
				return err
			}
			off += n
		}
	default:
		return fmt.Errorf("unknown role %q", role)
	}
	_ = h.Sum(nil)
	return spool.Sync()
}

func sendfileAll(out, file *os.File, off int64, n int) error {
	for n > 0 {
		w, err := unix.Sendfile(int(out.Fd()), int(file.Fd()), &off, n)
		if err != nil {
			return err
		}
		n -= w
	}
	return nil
}
