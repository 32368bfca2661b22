package install

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

func socketUnitPath(root string) string {
	return filepath.Join(root, "etc/systemd/system/cove-node.socket")
}

// unitValue is the value of key in the systemd unit text (the last one wins).
func unitValues(unit, key string) []string {
	var vals []string
	for _, line := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(line, key+"="); ok {
			vals = append(vals, v)
		}
	}
	return vals
}

// flagValue is the value of --name in argv.
func flagValue(argv []string, name string) string {
	if i := slices.Index(argv, name); i >= 0 && i+1 < len(argv) {
		return argv[i+1]
	}
	return ""
}

// The content-hook mode for real: node.sh installs into a sandbox with --content-hook;
// the test plays systemd (it listens on the socket unit's ListenStream and starts the
// unit's ExecStart with that socket as fd 3, LISTEN_FDS=1, LISTEN_PID); containerd runs
// from the edited config with cove-node as its content store and differ. ctr and crictl
// pull through cove-node and cove-cache, the blobs land in the content root cove-node
// serves, and containerd asks the resolver hook for manifests only (prefill). Then a
// second run changes nothing and --uninstall restores the sandbox byte for byte.
func TestInstallContentHook(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/hook:v1", 2, 1<<20)
	cache := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	root := shortDir(t) // the content socket lives under it: unix socket paths are short
	layout := peers.NewContainerdLayout(t)
	writeFile(t, configPath(root), layout.BaseConfig(3))
	before := snapshot(t, root)

	addr := freeAddr(t)
	args := installArgs(t, root, cache.URL, addr, "--origin-plain-http", origin.Addr, "--content-hook")
	out := mustRun(t, args...)
	t.Logf("first run:\n%s", out)
	if !strings.Contains(out, "content hook on") {
		t.Errorf("containerd did not check the content hook's configuration:\n%s", out)
	}
	installed := snapshot(t, root)
	out = mustRun(t, args...)
	sameTree(t, "second run", installed, snapshot(t, root))
	if !strings.Contains(out, "nothing to change") {
		t.Errorf("second run does not say it changed nothing:\n%s", out)
	}

	// The socket unit, and the service bound to it.
	sockUnit := readFile(t, socketUnitPath(root))
	listen := unitValues(sockUnit, "ListenStream")
	sock := filepath.Join(root, "run/cove-node/content.sock")
	if len(listen) != 1 || listen[0] != sock {
		t.Fatalf("socket unit ListenStream = %q, want %s:\n%s", listen, sock, sockUnit)
	}
	for _, want := range []string{"\nSocketMode=0660\n", "\nBefore=containerd.service\n", "\nWantedBy=sockets.target\n"} {
		if !strings.Contains(sockUnit, want) {
			t.Errorf("socket unit lacks %q:\n%s", strings.TrimSpace(want), sockUnit)
		}
	}
	unit := readFile(t, unitPath(root))
	for _, want := range []string{"\nRequires=cove-node.socket\n", "\nAfter=cove-node.socket\n", "\nRestartSec=0\n"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", strings.TrimSpace(want), unit)
		}
	}
	argv := strings.Fields(unitValues(unit, "ExecStart")[0])
	contentRoot := filepath.Join(layout.Root, "io.containerd.content.v1.content")
	for flag, want := range map[string]string{
		"--content-socket": sock, "--content-root": contentRoot, "--containerd-address": layout.Address,
		"--root": filepath.Join(root, "var/lib/cove-node"), "--addr": addr,
	} {
		if got := flagValue(argv, flag); got != want {
			t.Errorf("ExecStart %s = %q, want %q: %q", flag, got, want, argv)
		}
	}
	dropin := readFile(t, dropinPath(root))
	for _, want := range []string{
		"version = 3\n", `disabled_plugins = ["io.containerd.content.v1.content"]`, `address = "` + sock + `"`,
		`[plugins."io.containerd.cri.v1.images".registry]`, `config_path = "` + hostsDir(root) + `"`,
	} {
		if !strings.Contains(dropin, want) {
			t.Errorf("drop-in lacks %s:\n%s", want, dropin)
		}
	}
	if strings.Count(dropin, "version = ") != 1 {
		t.Errorf("drop-in has more than one version line:\n%s", dropin)
	}
	verifyUnit(t, root, socketUnitPath(root))

	// Play systemd: the socket first, then the service with it as fd 3.
	node := peers.StartCoveNodeActivated(t, argv, sock)
	ctd := peers.StartContainerdWithConfig(t, configPath(root), layout, hostsDir(root))
	if log := readFile(t, node.LogPath); !strings.Contains(log, `"socket_activated":true`) {
		t.Errorf("cove-node did not take the socket from fd 3:\n%s", log)
	}

	// ctr: transfer service, hosts.toml through --hosts-dir, unpack through cove-diff.
	if err := ctd.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ctd, img)
	checkContentRoot(t, contentRoot, img)
	afterCtr := node.Metric(t, "cove_node_requests_total")
	if afterCtr == 0 {
		t.Fatalf("ctr pull did not go through cove-node")
	}
	// containerd asked the mirror for the manifest only (HEAD by tag, GET by digest):
	// cove-node prefilled every blob into the store it serves containerd.
	if afterCtr > 2 {
		t.Errorf("containerd sent %v requests to the resolver hook; want at most 2 (the manifest): the content hook was not used", afterCtr)
	}

	// crictl: CRI, config_path from the same drop-in.
	crictlPullAfresh(t, ctx, ctd, img)
	checkContentRoot(t, contentRoot, img)
	afterCRI := node.Metric(t, "cove_node_requests_total")
	if afterCRI <= afterCtr || afterCRI-afterCtr > 2 {
		t.Errorf("crictl pull: %v requests to the resolver hook, want 1 or 2 (the manifest)\n%s", afterCRI-afterCtr, ctd.Log())
	}
	if n := node.Metric(t, "cove_node_requests_total", `served_by="origin"`); n != 0 {
		t.Errorf("%v requests fell back to the origin with a healthy cache", n)
	}
	for _, d := range blobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d across both pulls, want 1 (cove-cache fetches once)", d, n)
		}
	}
	t.Logf("cove-node requests: %v after ctr, %v after crictl", afterCtr, afterCRI)

	ctd.Stop()
	node.Stop()
	// systemd's part: the socket goes with the socket unit (RemoveOnStop), and /run is
	// a tmpfs.
	if err := os.RemoveAll(filepath.Join(root, "run")); err != nil {
		t.Fatal(err)
	}
	out = mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	t.Logf("uninstall:\n%s", out)
	if _, err := os.Stat(socketUnitPath(root)); !os.IsNotExist(err) {
		t.Errorf("socket unit still there after uninstall: %v", err)
	}
	sameTree(t, "uninstall", before, snapshot(t, root))
}

// checkContentRoot: every blob of img is a file in the content root cove-node serves.
func checkContentRoot(t *testing.T, contentRoot string, img peers.Image) {
	t.Helper()
	for _, d := range append(blobs(img), img.Digest) {
		algo, hexd, _ := strings.Cut(d, ":")
		if _, err := os.Stat(filepath.Join(contentRoot, "blobs", algo, hexd)); err != nil {
			t.Errorf("blob %s not in cove-node's content root: %v", d, err)
		}
	}
}

// shortDir is a directory under /tmp with a short name, removed at cleanup.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "cvi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Switching the content hook off (an install without --content-hook over one with it)
// takes the socket unit and the proxy plugins away; --uninstall still restores the node
// as it was before the first install.
func TestContentHookOffAndOn(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, configPath(root), "version = 3\n")
	before := snapshot(t, root)
	mirror := installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")
	hook := append(slices.Clone(mirror), "--content-hook")
	mustRun(t, hook...)
	if _, err := os.Stat(socketUnitPath(root)); err != nil {
		t.Fatalf("no socket unit: %v", err)
	}
	withHook := snapshot(t, root)
	out := mustRun(t, mirror...)
	if _, err := os.Stat(socketUnitPath(root)); !os.IsNotExist(err) {
		t.Errorf("socket unit still there with the content hook off: %v\n%s", err, out)
	}
	if d := readFile(t, dropinPath(root)); strings.Contains(d, "proxy_plugins") || strings.Contains(d, "disabled_plugins") {
		t.Errorf("drop-in with the content hook off:\n%s", d)
	}
	if argv := execStart(t, root); slices.Contains(argv, "--content-socket") {
		t.Errorf("ExecStart with the content hook off: %q", argv)
	}
	mustRun(t, hook...)
	sameTree(t, "content hook on again", withHook, snapshot(t, root))
	mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	sameTree(t, "uninstall", before, snapshot(t, root))
}
