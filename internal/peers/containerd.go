package peers

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Namespace is the containerd namespace every helper uses, ctr included. It is CRI's
// namespace, so an image pulled by either path is visible to ImageTarget and
// ReadAllContent, and a ctr pull followed by a crictl pull behaves like a node.
const Namespace = "k8s.io"

// MirrorDialTimeout is the dial_timeout WithMirror writes for each mirror. It bounds
// only the TCP connect (FIELD-NOTES §1); on loopback a live mirror connects at once
// and a stopped one refuses at once, so it matters only for black-holed addresses.
const MirrorDialTimeout = "1s"

// Containerd is a throwaway containerd v2 daemon with its own root, state and socket,
// the CRI image service enabled (for crictl) and registry hosts read from HostsDir by
// both pull paths.
type Containerd struct {
	// Address is the unix socket path of the gRPC API (ctr -a, crictl endpoints).
	Address string
	// Root and State are containerd's root and state directories.
	Root, State string
	// HostsDir is the registry hosts directory (hosts.toml tree): CRI's
	// registry.config_path and ctr's --hosts-dir. It is re-read on every pull, so
	// tests may rewrite files in it while containerd runs.
	HostsDir string
	// ConfigPath is the generated config.toml; LogPath is containerd's log.
	ConfigPath, LogPath string

	proc *proc
	dir  string // socket directory
}

// ContainerdOption configures StartContainerd.
type ContainerdOption func(*containerdConfig)

type containerdConfig struct {
	mirrors     []string
	pushMirrors map[string]bool // mirrors that also receive pushes
	fetchBuffer int
	extra       string
	localPull   bool // CRI pulls with client.Pull instead of the transfer service
}

// withLocalImagePull sets CRI's use_local_image_pull, the mode containerd also falls
// back to on its own when the CRI config holds a setting the transfer service does
// not support (internal/cri/config/config.go, CheckLocalImagePullConfigs). Tests use
// it to prove CRI's own concurrent_layer_fetch_buffer is applied in that mode.
func withLocalImagePull() ContainerdOption {
	return func(c *containerdConfig) { c.localPull = true }
}

// WithMirror adds url (e.g. "http://127.0.0.1:PORT") as a mirror for every registry,
// in HostsDir/_default/hosts.toml, with capabilities ["pull", "resolve"] so it never
// receives pushes, and dial_timeout inside its own [host] table (a top-level
// dial_timeout would apply only to a `server` entry). Repeat it for several mirrors;
// containerd tries them in the given order and the origin last.
func WithMirror(url string) ContainerdOption {
	return func(c *containerdConfig) { c.mirrors = append(c.mirrors, url) }
}

// WithConcurrentLayerFetchBuffer sets concurrent_layer_fetch_buffer to n bytes in
// both places containerd v2.3.4 reads it:
//   - [plugins."io.containerd.transfer.v1.local"] (plugins/transfer/plugin.go ->
//     core/transfer/local/pull.go): ctr image pull, and CRI pulls by default, since
//     CRI goes through the transfer service unless use_local_image_pull is set;
//   - [plugins."io.containerd.cri.v1.images"] (internal/cri/server/images/image_pull.go,
//     pullImageWithLocalPull): CRI in local-pull mode only.
//
// With n >= 512 (core/remotes/docker/fetcher.go, open) containerd fetches a blob
// larger than n as ceil(size/n) GETs, each `Range: bytes=X-` (open-ended), up to
// max_concurrent_downloads (3) at once, reading n bytes of each and closing it. A
// server that answers 200 instead of 206 turns it off for that blob.
func WithConcurrentLayerFetchBuffer(n int) ContainerdOption {
	return func(c *containerdConfig) { c.fetchBuffer = n }
}

// WithExtraConfig appends toml verbatim to the generated config (version 3). It may
// only add tables the generated config does not define, for example
// [proxy_plugins.NAME]; read Containerd.ConfigPath to see what is there.
func WithExtraConfig(toml string) ContainerdOption {
	return func(c *containerdConfig) { c.extra += "\n" + toml + "\n" }
}

// Plugins disabled so the daemon boots fast and touches nothing global: tracing,
// optional snapshotters and differs, image verifiers, the restart monitor, and
// /opt/containerd (the opt plugin creates it).
var disabledPlugins = []string{
	"io.containerd.internal.v1.opt",
	"io.containerd.internal.v1.tracing",
	"io.containerd.tracing.processor.v1.otlp",
	"io.containerd.snapshotter.v1.blockfile",
	"io.containerd.snapshotter.v1.erofs",
	"io.containerd.snapshotter.v1.native",
	"io.containerd.differ.v1.erofs",
	"io.containerd.mount-handler.v1.erofs",
	"io.containerd.image-verifier.v1.bindir",
	"io.containerd.monitor.container.v1.restart",
}

// writeConfigHead writes what every test containerd config starts with: the version,
// root and state, the plugins a test never needs disabled, the sockets, the log level,
// and the opening of the [plugins] table.
func writeConfigHead(b *strings.Builder, version int, root, state, sock string) {
	q := strconv.Quote
	fmt.Fprintf(b, "version = %d\nroot = %s\nstate = %s\n", version, q(root), q(state))
	b.WriteString("disabled_plugins = [")
	for i, p := range disabledPlugins {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(q(p))
	}
	b.WriteString("]\n\n")
	fmt.Fprintf(b, "[grpc]\n  address = %s\n\n[ttrpc]\n  address = %s\n\n", q(sock), q(sock+".ttrpc"))
	b.WriteString("[debug]\n  level = \"info\"\n\n")
	b.WriteString("[plugins]\n")
}

func (o containerdConfig) toml(root, state, sock, hostsDir, cniDir string) string {
	q := strconv.Quote
	var b strings.Builder
	writeConfigHead(&b, 3, root, state, sock)
	// ctr image pull goes through this plugin. Its own config_path is parsed but never
	// used in v2.3.4 (ctr must pass --hosts-dir); CRI's transfer-service pulls pass
	// CRI's config_path instead.
	b.WriteString("  [plugins.\"io.containerd.transfer.v1.local\"]\n")
	fmt.Fprintf(&b, "    config_path = %s\n", q(hostsDir))
	if o.fetchBuffer != 0 {
		fmt.Fprintf(&b, "    concurrent_layer_fetch_buffer = %d\n", o.fetchBuffer)
	}
	b.WriteString("\n  [plugins.\"io.containerd.cri.v1.images\"]\n    snapshotter = \"overlayfs\"\n")
	if o.localPull {
		b.WriteString("    use_local_image_pull = true\n")
	}
	if o.fetchBuffer != 0 {
		fmt.Fprintf(&b, "    concurrent_layer_fetch_buffer = %d\n", o.fetchBuffer)
	}
	// One directory: the default colon list is never found on the transfer path.
	fmt.Fprintf(&b, "    [plugins.\"io.containerd.cri.v1.images\".registry]\n      config_path = %s\n", q(hostsDir))
	b.WriteString("\n  [plugins.\"io.containerd.cri.v1.runtime\"]\n")
	// No CDI spec directories (the default watches /etc/cdi); network namespaces
	// under this instance's state directory, not /var/run/netns.
	b.WriteString("    cdi_spec_dirs = []\n    netns_mounts_under_state_dir = true\n")
	fmt.Fprintf(&b, "    [plugins.\"io.containerd.cri.v1.runtime\".cni]\n      bin_dirs = [%s]\n      conf_dir = %s\n", q(cniDir), q(cniDir))
	// The streaming server (exec/attach) binds loopback on a kernel-chosen port.
	b.WriteString("\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    disable_tcp_service = true\n    stream_server_address = \"127.0.0.1\"\n    stream_server_port = \"0\"\n")
	// NRI would listen on the global /var/run/nri/nri.sock.
	b.WriteString("\n  [plugins.\"io.containerd.nri.v1.nri\"]\n    disable = true\n")
	b.WriteString(o.extra)
	return b.String()
}

func (o containerdConfig) hostsTOML() string {
	var b strings.Builder
	b.WriteString("# Mirrors for every registry, tried in order; the origin is tried last.\n")
	for _, m := range o.mirrors {
		caps := `"pull", "resolve"`
		if o.pushMirrors[m] {
			caps += `, "push"`
		}
		fmt.Fprintf(&b, "\n[host.%s]\n  capabilities = [%s]\n  dial_timeout = %s\n",
			strconv.Quote(m), caps, strconv.Quote(MirrorDialTimeout))
	}
	return b.String()
}

// StartContainerd starts a containerd (config version 3) with its own root, state and
// socket, waits until its API answers, and stops it at cleanup (process group SIGTERM,
// SIGKILL after 10 s, then any mount or shim it left behind).
func StartContainerd(t testing.TB, opts ...ContainerdOption) *Containerd {
	t.Helper()
	return StartContainerdWith(t, ContainerdSetup{}, opts...)
}

// waitUnix waits until the unix socket at path accepts connections. containerd opens
// its gRPC socket only after every plugin has loaded.
func waitUnix(p *proc, path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		if done, err := p.exited(); done {
			return fmt.Errorf("exited: %v", err)
		}
		conn, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		lastErr = err
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("socket %s not ready after %v: %v", path, timeout, lastErr)
}

// Stop stops containerd and waits for it, then unmounts anything left under its
// directories and kills processes (shims) started for this instance. Idempotent.
func (c *Containerd) Stop() {
	c.proc.stop()
	killByArg(c.dir)
	unmountUnder(c.Root, c.State)
}

// killByArg kills processes whose command line mentions dir: shims this containerd
// started (they get -address <socket>) and that left its process group.
func killByArg(dir string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), dir+"/") {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// unmountUnder detaches every mount below the given directories, deepest first.
func unmountUnder(dirs ...string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		for _, d := range dirs {
			if strings.HasPrefix(mp, d+"/") {
				mps = append(mps, mp)
			}
		}
	}
	f.Close()
	for i := len(mps) - 1; i >= 0; i-- {
		_ = syscall.Unmount(mps[i], syscall.MNT_DETACH)
	}
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ctr runs ctr against this containerd in Namespace.
func (c *Containerd) ctr(ctx context.Context, args ...string) ([]byte, error) {
	bin := filepath.Join(ToolsDir(), "ctr")
	return runTool(ctx, bin, append([]string{"--address", c.Address, "--namespace", Namespace}, args...)...)
}

// failure wraps a tool failure with its output and the tail of containerd's log.
func (c *Containerd) failure(what string, out []byte, err error) error {
	return fmt.Errorf("%s: %w\n--- output:\n%s\n--- containerd log %s (tail):\n%s",
		what, err, strings.TrimSpace(string(out)), c.LogPath, logTail(c.LogPath, 25))
}

// Pull pulls and unpacks ref with `ctr image pull --hosts-dir HostsDir`, the transfer
// service path; extraArgs go before the reference (for example --user NAME:PASSWORD).
// A plain-HTTP origin on 127.0.0.1:PORT needs no flag: containerd
// treats loopback hosts on a port other than 443 as HTTPS-then-HTTP
// (core/remotes/docker/config/hosts.go), the same rule CRI pulls get.
func (c *Containerd) Pull(ctx context.Context, ref string, extraArgs ...string) error {
	args := append([]string{"image", "pull", "--hosts-dir", c.HostsDir}, extraArgs...)
	out, err := c.ctr(ctx, append(args, ref)...)
	if err != nil {
		return c.failure("ctr image pull "+ref, out, err)
	}
	return nil
}

// CrictlPull pulls ref through the CRI image service, as the kubelet would, so the
// CRI plugin's registry config_path (HostsDir) and its image pull path are exercised.
func (c *Containerd) CrictlPull(ctx context.Context, ref string) error {
	return c.CrictlPullWith(ctx, ref)
}

// CrictlPullWith is CrictlPull with extra arguments to `crictl pull` before the
// reference, for example "--creds", "USER:PASSWORD".
func (c *Containerd) CrictlPullWith(ctx context.Context, ref string, extraArgs ...string) error {
	bin := filepath.Join(ToolsDir(), "crictl")
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("crictl not found at %s: run `make tools`", bin)
	}
	ep := "unix://" + c.Address
	args := []string{
		"--config", filepath.Join(c.dir, "crictl.yaml"), // not /etc/crictl.yaml
		"--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "10m",
		"pull"}
	args = append(append(args, extraArgs...), ref)
	for {
		out, err := runTool(ctx, bin, args...)
		if err == nil {
			return nil
		}
		// The CRI plugin answers Unavailable until its background start-up finished.
		if strings.Contains(string(out), "not initialized yet") && ctx.Err() == nil {
			select {
			case <-time.After(50 * time.Millisecond):
				continue
			case <-ctx.Done():
			}
		}
		return c.failure("crictl pull "+ref, out, err)
	}
}

// ImageTarget returns the digest of the target descriptor containerd recorded for ref
// (the manifest or index digest), from `ctr images ls`.
func (c *Containerd) ImageTarget(ctx context.Context, ref string) (string, error) {
	out, err := c.ctr(ctx, "images", "ls", "name=="+ref)
	if err != nil {
		return "", c.failure("ctr images ls", out, err)
	}
	// REF TYPE DIGEST SIZE PLATFORMS LABELS
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == ref {
			return f[2], nil
		}
	}
	return "", fmt.Errorf("image %s not in containerd (namespace %s):\n%s", ref, Namespace, out)
}

type descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
}

type manifestOrIndex struct {
	MediaType string       `json:"mediaType"`
	Config    *descriptor  `json:"config"`
	Layers    []descriptor `json:"layers"`
	Manifests []descriptor `json:"manifests"`
}

// CheckPulled fails t unless c recorded img's manifest as the target of img.Ref and
// every blob of the image reads back intact from c's content store.
func CheckPulled(t testing.TB, ctx context.Context, c *Containerd, img Image) {
	t.Helper()
	got, err := c.ImageTarget(ctx, img.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if got != img.Digest {
		t.Fatalf("target of %s = %s, pushed %s", img.Ref, got, img.Digest)
	}
	if err := c.ReadAllContent(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
}

// ReadAllContent reads every blob of ref back from containerd's content store with
// `ctr content get` and checks each against its digest and size: the manifest (or
// index and the manifests present for this platform), the config and every layer.
// It proves the pull stored complete, correct content, not just metadata.
func (c *Containerd) ReadAllContent(ctx context.Context, ref string) error {
	target, err := c.ImageTarget(ctx, ref)
	if err != nil {
		return err
	}
	return c.readTree(ctx, descriptor{Digest: target, Size: -1})
}

// readTree reads d and, for a manifest or index, what it references. Size -1 marks the
// root, whose size and media type ctr images ls does not give.
func (c *Containerd) readTree(ctx context.Context, d descriptor) error {
	isMeta := d.Size < 0 || strings.Contains(d.MediaType, "manifest") || strings.Contains(d.MediaType, "index")
	var buf []byte
	var sink io.Writer = io.Discard
	if isMeta {
		sink = (*bytesWriter)(&buf)
	}
	if err := c.contentGet(ctx, d, sink); err != nil {
		return err
	}
	if !isMeta {
		return nil
	}
	var m manifestOrIndex
	if err := json.Unmarshal(buf, &m); err != nil {
		return fmt.Errorf("%s: not a manifest or index: %v", d.Digest, err)
	}
	if len(m.Manifests) > 0 {
		found := 0
		for _, child := range m.Manifests {
			err := c.readTree(ctx, child)
			if errors.Is(err, errNotFound) {
				continue // another platform, not pulled
			}
			if err != nil {
				return err
			}
			found++
		}
		if found == 0 {
			return fmt.Errorf("index %s: none of its %d manifests is in the content store", d.Digest, len(m.Manifests))
		}
		return nil
	}
	if m.Config == nil {
		return fmt.Errorf("%s: manifest without config", d.Digest)
	}
	for _, b := range append([]descriptor{*m.Config}, m.Layers...) {
		if err := c.readTree(ctx, b); err != nil {
			return err
		}
	}
	return nil
}

type bytesWriter []byte

func (w *bytesWriter) Write(p []byte) (int, error) { *w = append(*w, p...); return len(p), nil }

var errNotFound = errors.New("not found in content store")

// contentGet streams one blob from `ctr content get` into w, checking digest and size
// (size only when d.Size >= 0).
func (c *Containerd) contentGet(ctx context.Context, d descriptor, w io.Writer) error {
	algo, want, ok := strings.Cut(d.Digest, ":")
	if !ok || algo != "sha256" {
		return fmt.Errorf("unsupported digest %q", d.Digest)
	}
	cmd := exec.Command(filepath.Join(ToolsDir(), "ctr"), "--address", c.Address, "--namespace", Namespace,
		"content", "get", d.Digest)
	cmd.Env = cleanEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var stderr bytesWriter
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	defer stop()
	h := sha256.New()
	n, copyErr := io.Copy(io.MultiWriter(h, w), stdout)
	waitErr := cmd.Wait()
	if waitErr != nil {
		if strings.Contains(string(stderr), "not found") {
			return fmt.Errorf("%s: %w", d.Digest, errNotFound)
		}
		return c.failure("ctr content get "+d.Digest, stderr, errors.Join(waitErr, ctx.Err()))
	}
	if copyErr != nil {
		return fmt.Errorf("ctr content get %s: %w", d.Digest, copyErr)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("content %s reads back with digest sha256:%s (%d bytes)", d.Digest, got, n)
	}
	if d.Size >= 0 && n != d.Size {
		return fmt.Errorf("content %s reads back as %d bytes, descriptor says %d", d.Digest, n, d.Size)
	}
	return nil
}
