package server

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// Upload sessions: what cove-cache keeps of a blob upload between a client's requests.
//
// The origin answers an upload's start with a Location, the URL where the upload goes on
// (often with state in its query). That URL never reaches the client: the client gets
// cove-cache's own URL with an opaque handle (128 random bits), and every later request
// names the handle. cove-cache looks the handle up, checks that the request routes to the
// session's registry and repository, and sends the request to the path and query it
// keeps for the session: a path under that registry's /v2/<repository>/blobs/uploads/,
// checked when the origin named it, on the registry's own scheme and host. A client
// therefore chooses neither host nor path: a handle it made up, or one of another
// registry or repository, is 404 BLOB_UPLOAD_UNKNOWN and nothing is sent anywhere.
//
// With replicas (peer_upload.go), a handle starts with the MemberID of the replica that
// holds its session, and another replica a request reaches forwards it there.
//
// Each session spools the bytes it forwards to a file of its own (its chunks appended in
// order, digested on the way), so a blob pushed in several PATCH requests is assembled
// on disk; the blob is stored only after the origin's 201 and a matching digest.

// Defaults for Config.UploadSessions and Config.UploadMaxAge.
const (
	defaultUploadSessions = 1024
	defaultUploadMaxAge   = time.Hour
)

// errTooManyUploads refuses a new session when the table is full.
var errTooManyUploads = errors.New("too many upload sessions in progress")

type uploadSession struct {
	mu sync.Mutex // one request of a session at a time

	handle     string
	registry   string
	repository string
	// originPath and originQuery are where the origin said the upload goes on. Never
	// logged: the query may carry the origin's upload state.
	originPath  string
	originQuery string

	spool   *spool
	created time.Time
	used    time.Time
}

type uploadTable struct {
	mu       sync.Mutex
	sessions map[string]*uploadSession
	max      int
	maxAge   time.Duration
	dir      string
	now      func() time.Time
	holder   string // this replica's cluster.MemberID, the prefix of its handles ("" alone)
}

func newUploadTable(dir string, max int, maxAge time.Duration) (*uploadTable, error) {
	if max <= 0 {
		max = defaultUploadSessions
	}
	if maxAge <= 0 {
		maxAge = defaultUploadMaxAge
	}
	return &uploadTable{sessions: map[string]*uploadSession{}, max: max, maxAge: maxAge, dir: dir, now: time.Now}, nil
}

// open starts a session for an upload the origin accepted (its 202 and Location).
func (t *uploadTable) open(registry, repository, originPath, originQuery string) (*uploadSession, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	now := t.now()
	s := &uploadSession{
		handle:      t.holder + base64.RawURLEncoding.EncodeToString(b[:]),
		registry:    registry,
		repository:  repository,
		originPath:  originPath,
		originQuery: originQuery,
		created:     now,
		used:        now,
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(now)
	if len(t.sessions) >= t.max {
		return nil, errTooManyUploads
	}
	s.spool = newSpool(filepath.Join(t.dir, s.handle))
	t.sessions[s.handle] = s
	return s, nil
}

// get returns the session of handle for (registry, repository), locked; nil when there
// is none for them (unknown, expired, or another registry's or repository's).
func (t *uploadTable) get(handle, registry, repository string) *uploadSession {
	t.mu.Lock()
	now := t.now()
	t.expireLocked(now)
	s := t.sessions[handle]
	t.mu.Unlock()
	if s == nil || s.registry != registry || s.repository != repository {
		return nil
	}
	s.mu.Lock()
	t.mu.Lock()
	alive := t.sessions[handle] == s
	s.used = t.now()
	t.mu.Unlock()
	if !alive {
		s.mu.Unlock()
		return nil
	}
	return s
}

// close ends a session (the upload is complete, cancelled, or the origin forgot it).
// The caller holds s.mu.
func (t *uploadTable) close(s *uploadSession) {
	t.mu.Lock()
	if t.sessions[s.handle] == s {
		delete(t.sessions, s.handle)
	}
	t.mu.Unlock()
	s.spool.discard()
}

// expireLocked drops sessions idle for longer than maxAge, or older than 24 maxAges.
// A session busy with a request is skipped (its request is using it).
func (t *uploadTable) expireLocked(now time.Time) {
	for h, s := range t.sessions {
		if now.Sub(s.used) <= t.maxAge && now.Sub(s.created) <= 24*t.maxAge {
			continue
		}
		if !s.mu.TryLock() {
			continue
		}
		delete(t.sessions, h)
		s.spool.discard()
		s.mu.Unlock()
	}
}

// tempPath is a spool file name for an upload without a session (a monolithic POST).
func (t *uploadTable) tempPath() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return filepath.Join(t.dir, "post-"+base64.RawURLEncoding.EncodeToString(b[:]))
}

// full reports whether no session can be opened now (after ending expired ones).
func (t *uploadTable) full() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.expireLocked(t.now())
	return len(t.sessions) >= t.max
}

// len is the number of open sessions (tests, metrics).
func (t *uploadTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.sessions)
}

// location is cove-cache's URL of a session, as the client names the repository (its
// path prefix, or ns=).
func uploadLocation(name, handle, ns string) string {
	loc := "/v2/" + name + "/blobs/uploads/" + handle
	if ns != "" {
		loc += "?ns=" + url.QueryEscape(ns)
	}
	return loc
}

// originUploadURL checks the Location the origin answered an upload request with and
// returns its path and query. It must name the registry's own upload endpoint for
// repository: /v2/<repository>/blobs/uploads/<something>, relative or on the same
// scheme and host as the request that got it (originURL). Anything else (another host,
// another path, user information) is refused: cove-cache would never send there.
func originUploadURL(originURL, location, repository string) (path, rawQuery string, ok bool) {
	base, err := url.Parse(originURL)
	if err != nil || location == "" {
		return "", "", false
	}
	loc, err := url.Parse(location)
	if err != nil || loc.User != nil || loc.Fragment != "" {
		return "", "", false
	}
	u := base.ResolveReference(loc)
	if u.Scheme != base.Scheme || u.Host != base.Host || u.User != nil {
		return "", "", false
	}
	prefix := "/v2/" + repository + "/blobs/uploads/"
	p := u.EscapedPath()
	rest, found := strings.CutPrefix(p, prefix)
	if !found || rest == "" || strings.Contains(rest, "/") || strings.Contains(rest, "..") || strings.Contains(rest, "%") {
		return "", "", false
	}
	return p, u.RawQuery, true
}

// rangeEnd reads an upload's Range header (0-N, as distribution writes it, or
// bytes=0-N): the number of bytes the origin holds. ok is false without one.
func rangeEnd(h string) (int64, bool) {
	h = strings.TrimPrefix(h, "bytes=")
	start, end, found := strings.Cut(h, "-")
	if !found || start != "0" {
		return 0, false
	}
	n, err := strconv.ParseInt(end, 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n + 1, true
}

// wantDigest reads the digest= of an upload's completion.
func wantDigest(q url.Values) (digest.Digest, bool) {
	if len(q["digest"]) != 1 {
		return "", false
	}
	d, err := digest.Parse(q.Get("digest"))
	return d, err == nil
}
