package e2e

import (
	"bytes"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/cove-oci/cove/internal/peers"
)

// ptyOutput collects what a program writes to its terminal.
type ptyOutput struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	done chan struct{}
}

func readPTY(ptmx *os.File) *ptyOutput {
	o := &ptyOutput{done: make(chan struct{})}
	go func() {
		defer close(o.done)
		b := make([]byte, 4096)
		for {
			n, err := ptmx.Read(b)
			o.mu.Lock()
			o.buf.Write(b[:n])
			o.mu.Unlock()
			if err != nil { // EIO once the program has exited and closed the terminal
				return
			}
		}
	}()
	return o
}

func (o *ptyOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// waitFor waits until the output holds s.
func (o *ptyOutput) waitFor(t *testing.T, s string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if strings.Contains(o.String(), s) {
			return
		}
	}
	t.Fatalf("no %q on the terminal; it shows %q", s, o.String())
}

// On a pseudo-terminal, preheat draws a progress bar in place (bytes, rate, blobs done)
// instead of plain lines, and ends with the summary.
func TestPreheatProgressBarOnTerminal(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 2<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	cmd := preheatCmd(t, "", "--cache", cove.URL, img.Ref)
	ptmx, err := pty.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	out := readPTY(ptmx)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("preheat on a terminal: %v\n%q", err, out.String())
	}
	<-out.done
	s := out.String()
	t.Logf("terminal output: %q", s)
	// Redrawn in place: carriage return, erase line, the bar; full at the end.
	for _, want := range []string{"\r\x1b[K[", "] 100% 4.0 MiB / 4.0 MiB", "blobs 3/3", "/s  blobs",
		"preheated " + img.Ref + ": " + img.Digest, "summary: 1 of 1 references preheated"} {
		if !strings.Contains(s, want) {
			t.Fatalf("terminal output lacks %q: %q", want, s)
		}
	}
	if strings.Contains(s, "\nblob sha256:") {
		t.Fatalf("plain per-blob lines on a terminal: %q", s)
	}
}

// --user without a password asks for it on the terminal, without echoing it, and the
// login preheats a private image of a token-authenticated origin.
func TestPreheatPasswordPromptIsNotEchoed(t *testing.T) {
	const pw = "team-a-secret-1x"
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": pw})
	img := origin.Push(t, "team-a/app:v1", 1, 256<<10)
	realmHost := strings.TrimPrefix(origin.Tokens.Realm, "http://")
	realmHost = realmHost[:strings.Index(realmHost, "/")]
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--origin-allow", realmHost)

	cmd := preheatCmd(t, "", "--cache", cove.URL, "--user", "team-a", img.Ref)
	ptmx, err := pty.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	out := readPTY(ptmx)
	out.waitFor(t, "Password for team-a at "+origin.Addr+": ")
	// Type only once the program has turned echo off (the prompt comes just before).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		st, err := unix.IoctlGetTermios(int(ptmx.Fd()), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		if st.Lflag&unix.ECHO == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("echo never turned off for the password")
		}
	}
	if _, err := io.WriteString(ptmx, pw+"\n"); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	<-out.done
	s := out.String()
	if err != nil || !strings.Contains(s, "preheated "+img.Ref) {
		t.Fatalf("preheat with a prompted password: %v: %q", err, s)
	}
	if strings.Contains(s, pw) {
		t.Fatalf("the password was echoed: %q", s)
	}
}
