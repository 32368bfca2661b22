package content

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// BenchmarkPullContentHook pulls a 512 MiB, 4-layer image with `ctr image pull` from a
// local registry into a fresh containerd, alternating between containerd's built-in
// content store, the content hook (content + diff proxy plugins, Fragment), and the
// naive hook (content proxy plugin only, unpack through containerd's walking differ).
// Each is measured twice per round: a full pull, and a fetch-only pull
// (`--all-platforms`: ctr then asks the transfer service for no unpack). Medians of 3.
// Run: go test -run '^$' -bench PullContentHook -benchtime 1x ./plugin/content
func BenchmarkPullContentHook(b *testing.B) {
	const (
		layers    = 4
		layerSize = 128 << 20
		rounds    = 3
	)
	reg := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, reg.Addr, "bench/big:v1", layers, layerSize)
	b.ResetTimer()
	for range b.N {
		type sample struct{ pull, fetch, apply []time.Duration }
		res := map[string]*sample{}
		variants := []string{"builtin", "hook", "naive"}
		for _, v := range variants {
			res[v] = &sample{}
		}
		for round := range rounds {
			for _, v := range variants {
				for _, fetchOnly := range []bool{false, true} {
					d, applyTime := benchPull(b, v, img.Ref, fetchOnly)
					s := res[v]
					if fetchOnly {
						s.fetch = append(s.fetch, d)
					} else {
						s.pull = append(s.pull, d)
						s.apply = append(s.apply, applyTime)
					}
					b.Logf("round %d %-7s %-5s %6.2fs", round+1, v, map[bool]string{false: "pull", true: "fetch"}[fetchOnly], d.Seconds())
				}
			}
		}
		base := median(res["builtin"].pull)
		var tbl strings.Builder
		fmt.Fprintf(&tbl, "ctr image pull of %d MiB in %d layers, medians of %d (GOMAXPROCS %d):\n",
			img.Size>>20, layers, rounds, runtime.GOMAXPROCS(0))
		fmt.Fprintf(&tbl, "  %-8s %8s %8s %8s %12s\n", "store", "pull", "fetch", "apply", "pull/builtin")
		for _, v := range variants {
			s := res[v]
			apply := "-"
			if v == "hook" {
				apply = fmt.Sprintf("%.2fs", median(s.apply).Seconds())
			}
			fmt.Fprintf(&tbl, "  %-8s %7.2fs %7.2fs %8s %11.2fx\n", v, median(s.pull).Seconds(), median(s.fetch).Seconds(),
				apply, float64(median(s.pull))/float64(base))
		}
		b.Log("\n" + tbl.String())
		fmt.Print(tbl.String())
		b.ReportMetric(float64(median(res["hook"].pull))/float64(base), "hook/builtin")
		b.ReportMetric(float64(median(res["naive"].pull))/float64(base), "naive/builtin")
		b.ReportMetric(float64(median(res["hook"].fetch))/float64(median(res["builtin"].fetch)), "hook-fetch/builtin-fetch")
		b.ReportMetric(median(res["builtin"].pull).Seconds(), "builtin-s")
		b.ReportMetric(median(res["hook"].pull).Seconds(), "hook-s")
	}
}

// benchPull pulls ref into a fresh containerd using the given content store and
// returns the pull's duration and, for the hook, the time spent in its Apply calls.
func benchPull(b *testing.B, variant, ref string, fetchOnly bool) (time.Duration, time.Duration) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	root := filepath.Join(b.TempDir(), "root")
	defer os.RemoveAll(root)
	setup := peers.ContainerdSetup{Root: root}
	var svc *Service
	if variant != "builtin" {
		sock := filepath.Join(shortDir(b), "cove.sock")
		var err error
		svc, err = New(Config{Root: contentRoot(root), Socket: sock, Logger: quietLogger()})
		if err != nil {
			b.Fatal(err)
		}
		defer svc.Close()
		frag := Fragment(sock, runtime.GOARCH)
		if variant == "naive" {
			frag = naiveFragment(sock)
		}
		p := filepath.Join(b.TempDir(), "frag.toml")
		if err := os.WriteFile(p, []byte(frag), 0o644); err != nil {
			b.Fatal(err)
		}
		setup.Imports = []string{p}
	}
	c := peers.StartContainerdWith(b, setup)
	defer c.Stop()
	var args []string
	if fetchOnly {
		args = append(args, "--all-platforms")
	}
	start := time.Now()
	if err := c.Pull(ctx, ref, args...); err != nil {
		b.Fatal(err)
	}
	d := time.Since(start)
	if n := snapshotCount(b, ctx, c); fetchOnly != (n == 0) {
		b.Fatalf("%s fetchOnly=%v: %d snapshots", variant, fetchOnly, n)
	}
	var apply time.Duration
	if svc != nil {
		st := svc.Stats()
		apply = st.ApplyTime
		if want := map[bool]int64{true: 0, false: 4}[fetchOnly || variant == "naive"]; st.Applies != want {
			b.Fatalf("%s fetchOnly=%v: %d Apply calls on the hook, want %d", variant, fetchOnly, st.Applies, want)
		}
	}
	return d, apply
}

// naiveFragment is the content proxy plugin alone: what FIELD-NOTES measured.
func naiveFragment(sock string) string {
	return fmt.Sprintf("version = 3\ndisabled_plugins = [%q]\n\n[proxy_plugins.%s]\n  type = \"content\"\n  address = %s\n",
		BuiltinContentPlugin, ContentProxyName, strconv.Quote(sock))
}

func snapshotCount(b *testing.B, ctx context.Context, c *peers.Containerd) int {
	out, err := c.RunCtr(ctx, "snapshots", "--snapshotter", "overlayfs", "ls")
	if err != nil {
		b.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[len(f)-1] == "Committed" {
			n++
		}
	}
	return n
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
