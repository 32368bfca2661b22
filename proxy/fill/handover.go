package fill

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/containerd/errdefs"
)

// A fill can outlive the credential it started with: registry tokens last minutes, and
// a blob of tens of GB takes longer. Every caller that joins a fill passes its own
// FetchFunc (its credential, its repository); the fill keeps the most recent few. When
// an origin request after the first (a resume, a ranged segment) is refused (401, 403,
// or 404: see refusal), the fill asks again with the credential of another caller that joined it.
//
// When none is left, the fill waits for a fresh one (WithCredentialWait): it cuts off
// every client reading it when that client has read all there is (ErrCredentialWait),
// since a client cannot change its credential in the middle of a response; each client
// resumes with a Range request and, its token refreshed, joins the same fill, whose
// requests go on with that credential from the bytes the fill has. Starting a fresh
// fill instead would fetch the blob from its first byte again with a credential that
// expires as soon, and a blob that takes longer than a token lasts would never be
// whole. A fill nobody comes back to within the wait ends with an error: nothing is
// stored. The first request's refusal is not handed over: it is the starting
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

// ErrCredentialWait ends a client's read of a fill whose every credential the origin
// refused: the fill waits for the client to come back with a fresh one (a Range request
// from the byte it has). It wraps errdefs.ErrUnauthenticated.
var ErrCredentialWait = fmt.Errorf("fill waits for a fresh credential: resume: %w", errdefs.ErrUnauthenticated)

// defaultCredentialWait is how long a fill whose every credential was refused waits for
// a client to bring a fresh one: containerd and cove-node resume at once.
const defaultCredentialWait = 30 * time.Second

// WithCredentialWait sets how long a fill whose every credential the origin refused
// mid-fill waits for a client to come back with a fresh one before it ends (default
// 30 s; 0: it ends at once).
func WithCredentialWait(d time.Duration) Option {
	return func(m *Manager) { m.credentialWait = max(d, 0) }
}

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
	if f.starving {
		f.notify() // awaitCredential has one to try
	}
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
		if !f.handOver(i, res.StatusCode) && !f.awaitCredential(ctx) {
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

// awaitCredential waits, once every credential of the fill was refused, for a client to
// join with a fresh one (WithCredentialWait), and makes it the current one. Readers that
// were reading when the wait began are cut off when they have read all there is (see
// reader.next), so their clients resume with fresh credentials. It reports whether
// there is one to try; f.mu must not be held.
func (f *Fill) awaitCredential(ctx context.Context) bool {
	wait := f.m.credentialWait
	if wait <= 0 {
		return false
	}
	f.mu.Lock()
	if !f.starving {
		f.starving = true
		f.starveGen++
		f.notify()
		f.m.log.Info("origin refused every credential of a fill mid-fill: cutting its clients off to resume with fresh ones",
			"registry", f.Key.Registry, "digest", f.Key.Digest, "at", f.received, "wait", wait)
	}
	f.mu.Unlock()
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		f.mu.Lock()
		for j := len(f.fetchers) - 1; j >= 0; j-- {
			if !f.fetchers[j].refused {
				f.cur = j
				f.starving = false
				f.notify()
				f.mu.Unlock()
				f.m.log.Info("a client came back with a fresh credential: the fill goes on",
					"registry", f.Key.Registry, "digest", f.Key.Digest)
				return true
			}
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-t.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}
