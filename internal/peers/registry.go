package peers

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Registry is a running distribution registry v3: the origin in tests, or with
// WithProxyRemote the pull-through proxy cove is compared against.
type Registry struct {
	// Addr is host:port (always 127.0.0.1:PORT), the form image references use.
	Addr string
	// URL is http://Addr, the form hosts.toml and proxy remotes use.
	URL string
	// Dir holds the registry's config, storage and logs.
	Dir string

	accessLog string // stdout: one Apache combined-format line per request
	proc      *proc
}

// Request is one request as the registry logged it in its access log.
type Request struct {
	Method string
	Path   string // URL path without the query
	Query  string // raw query, e.g. "ns=127.0.0.1%3A5000" from containerd's mirror requests
	Status int
	Bytes  int64 // response body bytes the registry wrote
	// UserAgent tells who asked: "cove-cache" for cove-cache's origin requests,
	// containerd's own for a containerd that went to the origin itself.
	UserAgent string
}

// RegistryOption configures StartRegistry.
type RegistryOption func(*registryConfig)

type registryConfig struct {
	proxyRemote string
	users       map[string]string
	auth        string // an "auth:" stanza set by options in other files (WithTokenAuth)
	validation  string // a "validation:" stanza (WithManifestURLs)
	noDelete    bool   // storage.delete.enabled false (WithDeleteDisabled)
}

// WithHtpasswd makes the registry require HTTP basic authentication for user (it
// answers 401 with a Basic challenge otherwise): an origin whose answers depend on the
// client's credentials. Repeatable.
func WithHtpasswd(user, password string) RegistryOption {
	return func(c *registryConfig) {
		if c.users == nil {
			c.users = map[string]string{}
		}
		c.users[user] = password
	}
}

// WithProxyRemote runs the registry in pull-through proxy mode in front of url (for
// example another Registry's URL). This is the anchor cove is measured against. Note
// that distribution v3.0.0 panics at start when the remote is unreachable.
func WithProxyRemote(url string) RegistryOption {
	return func(c *registryConfig) { c.proxyRemote = url }
}

// WithManifestURLs lets pushed manifests carry non-distributable layers whose urls match
// one of the allow patterns (distribution's validation.manifests.urls.allow, regular
// expressions). distribution then does not check that such a layer's blob exists.
func WithManifestURLs(allow ...string) RegistryOption {
	return func(c *registryConfig) {
		var b strings.Builder
		b.WriteString("validation:\n  manifests:\n    urls:\n      allow:\n")
		for _, a := range allow {
			fmt.Fprintf(&b, "        - %s\n", strconv.Quote(a))
		}
		c.validation = b.String()
	}
}

// WithDeleteDisabled turns off the registry's content management (storage.delete.enabled
// false, distribution's default): it answers every manifest or blob DELETE with 405
// UNSUPPORTED. Without it, test registries allow deletes.
func WithDeleteDisabled() RegistryOption {
	return func(c *registryConfig) { c.noDelete = true }
}

// StartRegistry starts distribution v3 with filesystem storage on plain HTTP at
// 127.0.0.1 on a free port, waits until /v2/ answers, and stops it at cleanup.
func StartRegistry(t testing.TB, opts ...RegistryOption) *Registry {
	t.Helper()
	var cfg registryConfig
	for _, o := range opts {
		o(&cfg)
	}
	bin := Bin(t, "registry")
	dir := t.TempDir()
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		r, err := startRegistry(bin, dir, attempt, cfg)
		if err == nil {
			t.Cleanup(r.Stop)
			return r
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("peers: %v", lastErr)
	return nil
}

func startRegistry(bin, base string, attempt int, cfg registryConfig) (*Registry, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(base, fmt.Sprintf("registry-%d", attempt))
	if err := os.MkdirAll(filepath.Join(dir, "storage"), 0o755); err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	conf := fmt.Sprintf(`version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: %t
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
`, filepath.Join(dir, "storage"), !cfg.noDelete, addr)
	if cfg.proxyRemote != "" {
		conf += fmt.Sprintf("proxy:\n  remoteurl: %s\n", cfg.proxyRemote)
	}
	if len(cfg.users) > 0 {
		var lines strings.Builder
		for user, pass := range cfg.users {
			hash, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
			if err != nil {
				return nil, err
			}
			fmt.Fprintf(&lines, "%s:%s\n", user, hash)
		}
		htpasswd := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(htpasswd, []byte(lines.String()), 0o600); err != nil {
			return nil, err
		}
		conf += fmt.Sprintf("auth:\n  htpasswd:\n    realm: cove-test\n    path: %s\n", htpasswd)
	}
	conf += cfg.auth + cfg.validation
	confPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	r := &Registry{
		Addr:      addr,
		URL:       "http://" + addr,
		Dir:       dir,
		accessLog: filepath.Join(dir, "access.log"),
	}
	// No tracing exporter: the default would try an OTLP collector on localhost:4318.
	env := cleanEnv("OTEL_TRACES_EXPORTER=none")
	p, err := startProc("registry", bin, []string{"serve", confPath}, env,
		r.accessLog, filepath.Join(dir, "registry.log"), 2*time.Second)
	if err != nil {
		return nil, err
	}
	r.proc = p
	if err := waitHTTP(p, r.URL+"/v2/", 15*time.Second, len(cfg.users) > 0 || cfg.auth != ""); err != nil {
		p.stop()
		return nil, fmt.Errorf("registry at %s did not start: %v\nregistry log %s (tail):\n%s",
			addr, err, p.logPath, logTail(p.logPath, 30))
	}
	return r, nil
}

// waitHTTP polls url until it answers 200, the process exits, or timeout passes.
// With authRequired, a 401 also means ready.
func waitHTTP(p *proc, url string, timeout time.Duration, authRequired ...bool) error {
	return waitReady(p, &http.Client{Timeout: time.Second}, url, timeout, len(authRequired) > 0 && authRequired[0])
}

// waitReady polls url with client until it answers 200 (or 401 when authRequired), the
// process exits, or timeout passes.
func waitReady(p *proc, client *http.Client, url string, timeout time.Duration, authRequired bool) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		if done, err := p.exited(); done {
			return fmt.Errorf("exited: %v", err)
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || authRequired && resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		lastErr = err
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("not ready after %v: %v", timeout, lastErr)
}

// Stop kills the registry and waits for it. Idempotent; tests call it to make an
// origin go away, and cleanup calls it again.
func (r *Registry) Stop() { r.proc.stop() }

// combined-format access log (gorilla/handlers CombinedLoggingHandler):
// 127.0.0.1 - - [02/Jan/2006:15:04:05 -0700] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 1234 "ref" "ua"
var accessLine = regexp.MustCompile(`^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\S+)(?: "[^"]*" "([^"]*)")?`)

// Requests returns every request the registry has logged so far, oldest first,
// parsed from its own access log, so tests see exactly what reached the registry
// (including the harness's own: the readiness GET /v2/ and PushRandomImage's uploads;
// take len(Requests()) before an action and slice from there).
// The registry writes a line when its handler returns, which can be a moment after the
// client has the last byte, so Requests first waits (at most 1 s) for the log to stop
// growing.
func (r *Registry) Requests() []Request {
	settle(r.accessLog)
	f, err := os.Open(r.accessLog)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []Request
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		m := accessLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		status, _ := strconv.Atoi(m[3])
		n, _ := strconv.ParseInt(m[4], 10, 64) // "-" parses as 0
		path, query, _ := strings.Cut(m[2], "?")
		out = append(out, Request{Method: m[1], Path: path, Query: query, Status: status, Bytes: n, UserAgent: m[5]})
	}
	return out
}

// settle waits until path's size is unchanged over 30 ms, or 1 s passed.
func settle(path string) {
	size := int64(-1)
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		st, err := os.Stat(path)
		if err != nil {
			return
		}
		if st.Size() == size {
			return
		}
		size = st.Size()
		time.Sleep(30 * time.Millisecond)
	}
}

var blobPath = regexp.MustCompile(`^/v2/.+/blobs/([a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+)$`)

// BlobGETs counts GET /v2/<name>/blobs/<digest> requests per digest, whatever their
// status. Parallel Range fetches show up as several GETs of one digest.
func (r *Registry) BlobGETs() map[string]int {
	m := map[string]int{}
	for _, q := range r.Requests() {
		if q.Method != http.MethodGet {
			continue
		}
		if sm := blobPath.FindStringSubmatch(q.Path); sm != nil {
			m[sm[1]]++
		}
	}
	return m
}
