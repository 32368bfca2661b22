package fill

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/containerd/errdefs"
)

// A fill can outlive the credential it started with: registry tokens last minutes, and
// a blob of tens of GB takes longer. Every caller that joins a fill passes its own
// FetchFunc (its credential, its repository); the fill keeps the most recent few. When
// an origin request after the first (a resume, a ranged segment) is refused (401, 403,
// or 404: see refusal), the fill asks again with the credential of another caller that joined it; when
// none is left it ends with an error, so each client's transfer breaks and the client
// resumes with a Range request of its own, which starts a fresh fill with its fresh
// credential. The first request's refusal is not handed over: it is the starting
// client's answer, relayed to it (see Response).
//
// Handing over is safe for what is stored: the bytes are the digest's whatever
// credential fetched them, and the fill verifies the whole blob before it is stored. A
// joiner's FetchFunc asks in the joiner's own repository, which the origin authorizes
// for that joiner.

// maxFetchers bounds the credentials a fill keeps.
const maxFetchers = 8

// errCredential marks an origin refusal of every credential a fill holds.
var errCredential = errors.New("origin refused the fill's credentials")

// fetcher is one joiner's way to ask the origin.
type fetcher struct {
	owner   string
	fetch   FetchFunc
	refused bool // the origin answered it 401/403 during this fill
}

// addFetcher keeps a joiner's FetchFunc, the newest for its owner; f.mu must not be held.
func (f *Fill) addFetcher(owner string, fetch FetchFunc) {
	if fetch == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.fetchers {
		if f.fetchers[i].owner == owner && !f.fetchers[i].refused {
			f.fetchers[i].fetch = fetch
			return
		}
	}
	if len(f.fetchers) >= maxFetchers {
		// Drop a refused one, else the oldest that is not in use.
		drop := -1
		for i := range f.fetchers {
			if i != f.cur && (drop < 0 || f.fetchers[i].refused) {
				drop = i
				if f.fetchers[i].refused {
					break
				}
			}
		}
		f.fetchers = append(f.fetchers[:drop], f.fetchers[drop+1:]...)
		if f.cur > drop {
			f.cur--
		}
	}
	f.fetchers = append(f.fetchers, fetcher{owner: owner, fetch: fetch})
}

// handOver marks fetcher i refused and moves the fill to the newest one not refused.
// It reports whether there is one; f.mu must not be held.
func (f *Fill) handOver(i, status int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cur != i && !f.fetchers[f.cur].refused {
		return true // another request handed over already
	}
	f.fetchers[i].refused = true
	for j := len(f.fetchers) - 1; j >= 0; j-- {
		if !f.fetchers[j].refused {
			f.cur = j
			f.m.log.Info("origin refused a fill's credential mid-fill: continuing with another waiter's",
				"registry", f.Key.Registry, "digest", f.Key.Digest, "status", status)
			return true
		}
	}
	return false
}

// originFetch asks the origin for the blob's bytes from through to (to < 0: to the end)
// with the fill's current credential, handing over to another on a refusal. Its error
// wraps errCredential when every credential was refused.
func (f *Fill) originFetch(ctx context.Context, from, to int64) (*http.Response, error) {
	for {
		f.mu.Lock()
		i := f.cur
		fetch := f.fetchers[i].fetch
		f.mu.Unlock()
		res, err := fetch(ctx, from, to)
		if err != nil {
			return nil, err
		}
		if !refusal(res.StatusCode) {
			return res, nil
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		if !f.handOver(i, res.StatusCode) {
			var class error = errdefs.ErrUnauthenticated
			switch res.StatusCode {
			case http.StatusForbidden:
				class = errdefs.ErrPermissionDenied
			case http.StatusNotFound:
				class = errdefs.ErrNotFound
			}
			f.m.log.Warn("origin refused every credential of a fill mid-fill: ending it so its clients resume",
				"registry", f.Key.Registry, "digest", f.Key.Digest, "status", res.StatusCode)
			return nil, fmt.Errorf("%w: %w: origin answered %d at byte %d, and no waiter's credential is left", errCredential, class, res.StatusCode, from)
		}
	}
}

// refusal reports whether an origin's answer to a request after a fill's first refuses
// the credential: 401 (a token expired), 403, or 404, which a registry answers a
// credential that may not see the repository (the blob was there: the first request
// got it). A joiner whose own request was never authorized (its client is refused by
// the server after joining) is thus passed over, not taken for the blob's absence.
func refusal(status int) bool {
	return status == http.StatusUnauthorized || status == http.StatusForbidden || status == http.StatusNotFound
}
