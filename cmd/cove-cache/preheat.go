package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/platforms"
	"github.com/google/go-containerregistry/pkg/authn"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/term"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/internal/preheat"
)

const preheatUsage = `Usage: cove-cache preheat --cache URL [--platform OS/ARCH ...|--all-platforms] [--user [REGISTRY/]USER[:PASSWORD] [--password-stdin]] REF...

Fills a running cove-cache ahead of use: every manifest, config and layer of each image
REF (naming its origin registry, e.g. ghcr.io/team/app:v1) is fetched through the cache,
verified and discarded, with the same authorization as any pull. Credentials: --user,
else the docker config file (docker login REGISTRY). Exit status: 0 when every reference
is in the cache, 1 when one failed (each is named), 2 for bad usage.

`

type preheatOptions struct {
	cache         *url.URL
	platforms     []ocispec.Platform
	allPlatforms  bool
	login         *preheatLogin
	passwordStdin bool
	targets       []preheat.Target
}

func parsePreheat(args []string, stderr io.Writer) (*preheatOptions, error) {
	o := &preheatOptions{}
	var cache, user string
	var plats cli.Repeated
	fs := flag.NewFlagSet("cove-cache preheat", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, preheatUsage); fs.PrintDefaults() }
	fs.StringVar(&cache, "cache", "", "the cove-cache `URL` (http(s)://HOST[:PORT]) to fill")
	fs.Var(&plats, "platform", "fetch the manifests of an index for `OS/ARCH[/VARIANT]` (repeatable, or comma-separated); default: this machine's, "+platforms.DefaultString())
	fs.BoolVar(&o.allPlatforms, "all-platforms", false, "fetch every manifest of an index")
	fs.StringVar(&user, "user", "", "log in as `[REGISTRY/]USER[:PASSWORD]` (a plain USER is for the one registry the references name); without :PASSWORD it is read from --password-stdin or asked for")
	fs.BoolVar(&o.passwordStdin, "password-stdin", false, "read the --user password from standard input")
	// Flags may follow references: parse again after each one.
	var refs []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			break
		}
		refs = append(refs, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if cache == "" {
		return nil, errors.New("--cache URL is required")
	}
	u, err := url.Parse(cache)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("--cache %q: want http(s)://HOST[:PORT] and nothing more", cache)
	}
	u.Path = ""
	o.cache = u
	for _, list := range plats {
		for _, s := range strings.Split(list, ",") {
			p, err := parsePlatform(strings.TrimSpace(s))
			if err != nil {
				return nil, err
			}
			o.platforms = append(o.platforms, p)
		}
	}
	if o.allPlatforms && len(o.platforms) > 0 {
		return nil, errors.New("--platform and --all-platforms: give one")
	}
	if len(refs) == 0 {
		return nil, errors.New("no image reference to preheat")
	}
	var registries []string
	for _, r := range refs {
		t, err := preheat.ParseTarget(r)
		if err != nil {
			return nil, err
		}
		o.targets = append(o.targets, t)
		if !slices.Contains(registries, t.Registry) {
			registries = append(registries, t.Registry)
		}
	}
	if o.passwordStdin && user == "" {
		return nil, errors.New("--password-stdin needs --user")
	}
	if user != "" {
		l, err := parseLogin(user)
		if err != nil {
			return nil, err
		}
		if err := l.bind(registries); err != nil {
			return nil, err
		}
		o.login = &l
	}
	return o, nil
}

// Operating systems and architectures a platform may name (GOOS and GOARCH values, as
// image indexes use them).
var (
	knownOS   = strings.Fields("aix android darwin dragonfly freebsd hurd illumos ios js linux netbsd openbsd plan9 solaris wasip1 windows zos")
	knownArch = strings.Fields("386 amd64 arm arm64 arm64be armbe loong64 mips mips64 mips64le mipsle ppc ppc64 ppc64le riscv riscv64 s390 s390x sparc sparc64 wasm")
)

// parsePlatform reads OS/ARCH[/VARIANT], normalized as containerd does (x86_64 is amd64).
func parsePlatform(s string) (ocispec.Platform, error) {
	p, err := platforms.Parse(s)
	if err != nil || !strings.Contains(s, "/") || !slices.Contains(knownOS, p.OS) || !slices.Contains(knownArch, p.Architecture) {
		return ocispec.Platform{}, fmt.Errorf("--platform %q: want OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8", s)
	}
	return p, nil
}

func runPreheat(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	o, err := parsePreheat(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "cove-cache preheat: %v\n", err)
		return 2
	}
	if o.login != nil {
		if err := o.login.readPassword(o.passwordStdin, stdin, stderr); err != nil {
			fmt.Fprintf(stderr, "cove-cache preheat: %v\n", err)
			return 2
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.ResponseHeaderTimeout = 2 * time.Minute
	if err := pingCache(ctx, base, o.cache); err != nil {
		fmt.Fprintf(stderr, "cove-cache preheat: cannot reach the cache at %s: %v\n", o.cache, err)
		return 1
	}
	tty := false
	if f, ok := stderr.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	progress := preheat.NewProgress(stderr, tty)
	start := time.Now()
	results := preheat.Run(ctx, preheat.Options{
		Cache:        o.cache,
		Platforms:    o.platforms,
		AllPlatforms: o.allPlatforms,
		Auth:         preheatAuth(o.login, authn.DefaultKeychain, o.cache.Host),
		Transport:    base,
		Progress:     progress,
	}, o.targets)
	return summarize(stdout, stderr, results, progress.Bytes(), time.Since(start))
}

// pingCache checks that something answers HTTP at the cache URL (any status).
func pingCache(ctx context.Context, rt http.RoundTripper, cache *url.URL) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cache.String()+"/v2/", nil)
	if err != nil {
		return err
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// summarize prints one line per reference and a total to stdout, names the failed
// references on stderr, and returns the exit status.
func summarize(stdout, stderr io.Writer, results []preheat.Result, bytes int64, elapsed time.Duration) int {
	var failed []string
	for _, r := range results {
		if r.Err != nil {
			failed = append(failed, r.Ref)
			fmt.Fprintf(stdout, "FAILED %s: %v\n", r.Ref, oneLine(r.Err))
			continue
		}
		fmt.Fprintf(stdout, "preheated %s: %s (%s)\n", r.Ref, r.Resolved, preheat.Counts(r.Manifests, r.Blobs, r.Bytes))
	}
	rate := int64(0)
	if elapsed > 0 {
		rate = int64(float64(bytes) / elapsed.Seconds())
	}
	fmt.Fprintf(stdout, "summary: %d of %d references preheated, %s fetched through the cache in %s (%s/s)",
		len(results)-len(failed), len(results), preheat.Size(bytes), elapsed.Round(10*time.Millisecond), preheat.Size(rate))
	if len(failed) > 0 {
		fmt.Fprintf(stdout, "; failed: %s\n", strings.Join(failed, ", "))
		fmt.Fprintf(stderr, "cove-cache preheat: %d of %d references failed: %s\n", len(failed), len(results), strings.Join(failed, ", "))
		return 1
	}
	fmt.Fprintln(stdout)
	return 0
}

func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }
