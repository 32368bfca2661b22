package mirror

import (
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/cove-oci/cove/proxy/route"
)

// Reasons a pull went round the cache (Config.AroundCache).
const (
	// AroundNoCredentials: containerd answered the challenge with no credential at all.
	AroundNoCredentials = "no-credentials"
	// AroundRefused: containerd sent a credential (often an anonymous token) and it was
	// refused too.
	AroundRefused = "credentials-refused"
)

// aroundWatch notices pulls that leave the cache for want of credentials. containerd
// moves to its next host, the origin, on a 401 from a mirror; when the credentials it
// holds are not handed to the mirror (CRI passes a pull's credentials only to the host
// its AuthConfig.server_address names, or to every host when that is empty), every
// request of the pull gets a 401 here and the pull succeeds at the origin, silently
// bypassing the cache. What cove-node sees of it: a 401 to a manifest request for a
// repository, and no successful answer for that repository within a window. A pull
// whose credentials the origin refuses looks the same here (it fails there too).
type aroundWatch struct {
	window, logEvery time.Duration
	report           func(registry, repository, reason string)
	log              *slog.Logger

	mu     sync.Mutex
	open   map[repoKey]*episode
	logged map[repoKey]time.Time
}

type repoKey struct{ registry, repository string }

type episode struct {
	timer       *time.Timer
	credentials bool // a 401'd request of this repository carried a credential
}

// maxLogged bounds the rate limiter's memory; past it, old entries are dropped.
const maxLogged = 4096

func newAroundWatch(window, logEvery time.Duration, report func(registry, repository, reason string), log *slog.Logger) *aroundWatch {
	return &aroundWatch{window: window, logEvery: logEvery, report: report, log: log,
		open: map[repoKey]*episode{}, logged: map[repoKey]time.Time{}}
}

// saw records the status cove-node answered a request for req with (from cove-cache or
// a prefill) and whether the request carried a credential.
func (a *aroundWatch) saw(req *route.Request, r *http.Request, status int) {
	if a == nil || req.Registry == "" || req.Repository == "" {
		return
	}
	k := repoKey{req.Registry, req.Repository}
	credentials := r.Header.Get("Authorization") != ""
	a.mu.Lock()
	defer a.mu.Unlock()
	ep := a.open[k]
	switch {
	case status < 400:
		if ep != nil { // authorized through the mirror after all
			ep.timer.Stop()
			delete(a.open, k)
		}
	case status == http.StatusUnauthorized:
		if ep == nil {
			if req.Kind != route.KindManifest {
				return // a pull starts with its manifest
			}
			ep = &episode{}
			ep.timer = time.AfterFunc(a.window, func() { a.expire(k, ep) })
			a.open[k] = ep
		}
		ep.credentials = ep.credentials || credentials
	}
}

func (a *aroundWatch) expire(k repoKey, ep *episode) {
	a.mu.Lock()
	if a.open[k] != ep {
		a.mu.Unlock()
		return
	}
	delete(a.open, k)
	reason := AroundNoCredentials
	if ep.credentials {
		reason = AroundRefused
	}
	now := time.Now()
	logIt := now.Sub(a.logged[k]) >= a.logEvery
	if logIt {
		if len(a.logged) >= maxLogged {
			for lk, at := range a.logged {
				if now.Sub(at) >= a.logEvery || len(a.logged) >= maxLogged {
					delete(a.logged, lk)
				}
			}
		}
		a.logged[k] = now
	}
	a.mu.Unlock()
	a.report(k.registry, k.repository, reason)
	if logIt {
		a.log.Warn("a pull went round the cache: containerd had no credential the registry accepts for this repository at cove-node, "+
			"and moved on to the registry itself (credentials given for another server_address? see docs/node.md)",
			"registry", k.registry, "repository", k.repository, "reason", reason, "window", a.window)
	}
}

// close stops the pending timers.
func (a *aroundWatch) close() {
	if a == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, ep := range a.open {
		ep.timer.Stop()
		delete(a.open, k)
	}
}
