// Package authz makes cove-cache's one security decision: may this credential read this
// digest in this repository of this registry, now?
//
// The answer combines four things, each kept here and nowhere else:
//
//   - allowance: the origin recently answered this credential 200 for something in the
//     repository (per credential, short: Config.TTL);
//   - membership: the origin answered 200 for this digest in this repository, to anyone
//     (per registry, repository and digest, long-lived: membership does not depend on
//     who asks). A manifest's listing is never membership: registries accept manifests
//     whose subject or non-distributable layers name digests the repository does not
//     hold, so a listing only schedules checks (see the server's prefetch);
//   - the origin's own answer, asked with the client's credentials (a HEAD of the digest
//     in the repository) whenever the two above do not already say yes;
//   - the offline policy, when the origin cannot answer.
//
// Provenance (which registry a stored blob came from) is the server's: it says whether a
// byte may be served for a registry at all, before this decision is asked.
package authz

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/httpx"
)

// Offline policies (Config.Offline).
const (
	OfflineDeny   = "deny"
	OfflineRecent = "recent"
)

// Config configures an Authorizer.
type Config struct {
	// TTL is how long the origin's yes to a credential for a repository lets cached
	// members of the repository be served without asking again (default 10 s; < 0: never).
	TTL time.Duration
	// Offline is the policy when the origin cannot answer: OfflineDeny (default) or
	// OfflineRecent (serve members to a credential whose allowance is younger than
	// OfflineMaxAge, default 1 h).
	Offline       string
	OfflineMaxAge time.Duration
	// Records keeps memberships (a storage.Driver satisfies it).
	Records Records
	// Now is the clock (tests inject one).
	Now func() time.Time
	// OnRecordError is told when a membership record could not be written or dropped.
	OnRecordError func(op string, err error)
}

// Authorizer holds what the decision is made from.
type Authorizer struct {
	allow         *allowances
	refused       *challenges
	members       members
	offline       string
	offlineMaxAge time.Duration
}

// New returns an Authorizer.
func New(cfg Config) (*Authorizer, error) {
	if cfg.Records == nil {
		return nil, fmt.Errorf("authz: no record store")
	}
	if cfg.TTL == 0 {
		cfg.TTL = 10 * time.Second
	}
	if cfg.Offline == "" {
		cfg.Offline = OfflineDeny
	}
	if cfg.Offline != OfflineDeny && cfg.Offline != OfflineRecent {
		return nil, fmt.Errorf("authz: offline policy %q: want %s or %s", cfg.Offline, OfflineDeny, OfflineRecent)
	}
	if cfg.OfflineMaxAge == 0 {
		cfg.OfflineMaxAge = time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.OnRecordError == nil {
		cfg.OnRecordError = func(string, error) {}
	}
	a := &Authorizer{
		allow:         newAllowances(cfg.TTL, cfg.OfflineMaxAge),
		refused:       newChallenges(cfg.TTL),
		members:       members{records: cfg.Records, onError: cfg.OnRecordError},
		offline:       cfg.Offline,
		offlineMaxAge: cfg.OfflineMaxAge,
	}
	a.allow.now, a.refused.now = cfg.Now, cfg.Now
	return a, nil
}

// Credential is the identity a decision is kept for: a SHA-256 of the client's
// Authorization header, the only form in which credentials are remembered (in memory).
// Anonymous clients share one identity.
type Credential string

// CredentialOf returns the identity of the credentials in a client's request header.
func CredentialOf(h http.Header) Credential {
	sum := sha256.Sum256([]byte(httpx.CredentialKey(h)))
	return Credential(hex.EncodeToString(sum[:]))
}

// Object names what is asked for: a digest in a repository of a registry.
type Object struct {
	Registry   string
	Repository string
	Digest     digest.Digest
}

// scope is the key of per-credential state: (credential, registry, repository).
func scope(c Credential, o Object) string {
	return string(c) + "|" + o.Registry + "|" + o.Repository
}

// OriginAnswer is the origin's answer to a check: its status and headers, or the error
// that kept it from answering.
type OriginAnswer struct {
	Status int
	Header http.Header
	Err    error
}

// AskOrigin asks the origin, with the client's own credentials, whether it may read the
// object (a HEAD of the digest in the repository).
type AskOrigin func(ctx context.Context) OriginAnswer

// Verdict is what a decision says.
type Verdict int

const (
	// Allow: serve the cached object.
	Allow Verdict = iota
	// AllowStale: the origin could not answer and the offline policy serves the object;
	// the response must say it is stale.
	AllowStale
	// Deny: relay the origin's answer (Decision.Status, Decision.Header).
	Deny
	// Unavailable: the origin could not be asked (Decision.Err); serve nothing cached.
	Unavailable
)

// Decision is the answer to MayRead.
type Decision struct {
	Verdict Verdict
	Status  int         // Deny: the origin's status
	Header  http.Header // Deny: the origin's headers (a 401's challenge)
	Err     error       // Unavailable
	Asked   bool        // the origin was asked
}

// MayRead decides whether credential c may be served the cached object o now.
//
// Yes without asking the origin when o is a member of its repository and c has a fresh
// allowance there. No without asking when the origin refused c there moments ago (its
// 401 is relayed again). Otherwise the origin is asked, and its answer teaches: a 200
// makes an allowance and a membership; a 404, to a credential the origin otherwise
// allows in the repository, ends the membership (nobody else can erase it); a 401 is
// remembered as briefly as an allowance.
func (a *Authorizer) MayRead(ctx context.Context, c Credential, o Object, ask AskOrigin) Decision {
	own := scope(c, o)
	member := a.members.has(ctx, o)
	if member && a.allow.fresh(own) {
		return Decision{Verdict: Allow}
	}
	if h, ok := a.refused.get(own); ok {
		return Decision{Verdict: Deny, Status: http.StatusUnauthorized, Header: h}
	}
	ans := ask(ctx)
	if unanswered(ans) {
		return a.whenUnanswered(member, own, ans)
	}
	switch ans.Status {
	case http.StatusOK:
		a.Learn(ctx, c, o)
		return Decision{Verdict: Allow, Asked: true}
	case http.StatusNotFound:
		a.NotFound(ctx, c, o)
	case http.StatusUnauthorized:
		a.Refused(c, o, ans.Header)
	}
	return Decision{Verdict: Deny, Status: ans.Status, Header: ans.Header, Asked: true}
}

// MayReadRepository decides whether credential c may be served something cached that
// belongs to o's repository as a whole rather than to one digest in it (a referrers
// list: it is the repository's answer about a subject, not a member of it). o.Digest is
// unused.
//
// Yes without asking when c has a fresh allowance there; no without asking when the
// origin refused c there moments ago. Otherwise ask is called (the caller's origin
// request, whose answer it keeps): a 200 makes an allowance, a 401 is remembered, and
// any other answer is the caller's to read (Deny with the origin's status).
func (a *Authorizer) MayReadRepository(ctx context.Context, c Credential, o Object, ask AskOrigin) Decision {
	own := scope(c, o)
	if a.allow.fresh(own) {
		return Decision{Verdict: Allow}
	}
	if h, ok := a.refused.get(own); ok {
		return Decision{Verdict: Deny, Status: http.StatusUnauthorized, Header: h}
	}
	return a.RepositoryAnswer(c, o, ask(ctx))
}

// RepositoryAnswer is the decision the origin's answer to c in o's repository makes, and
// what it teaches: a 200 makes an allowance, a 401 is remembered; when the origin could
// not answer, the offline policy decides.
func (a *Authorizer) RepositoryAnswer(c Credential, o Object, ans OriginAnswer) Decision {
	own := scope(c, o)
	if unanswered(ans) {
		return a.whenUnanswered(true, own, ans)
	}
	switch ans.Status {
	case http.StatusOK:
		a.Allowed(c, o)
		return Decision{Verdict: Allow, Asked: true}
	case http.StatusUnauthorized:
		a.Refused(c, o, ans.Header)
	}
	return Decision{Verdict: Deny, Status: ans.Status, Header: ans.Header, Asked: true}
}

// AllowedNow reports whether the origin let c read from o's repository within the
// allowance TTL.
func (a *Authorizer) AllowedNow(c Credential, o Object) bool { return a.allow.fresh(scope(c, o)) }

// Learn records the origin's 200 to c for o: the object is a member of its repository,
// and c is allowed there. Call it for every 200 the origin gives for a digest in a
// repository (a fill's GET, a HEAD, a tag resolving to a digest, a manifest by digest).
func (a *Authorizer) Learn(ctx context.Context, c Credential, o Object) {
	a.Allowed(c, o)
	a.members.add(ctx, o)
}

// Allowed records that the origin let c read from o's repository (o.Digest unused).
func (a *Authorizer) Allowed(c Credential, o Object) {
	own := scope(c, o)
	a.allow.allow(own)
	a.refused.forget(own)
}

// NotFound records the origin's 404 to c for o. It ends o's membership only when c is
// an allowed reader of the repository: a stranger's 404 (some registries answer 404
// rather than 401 to those they refuse) erases nothing others rely on.
func (a *Authorizer) NotFound(ctx context.Context, c Credential, o Object) {
	if a.allow.fresh(scope(c, o)) {
		a.members.drop(ctx, o)
	}
}

// Forget records the origin's 202 to a DELETE of o: its repository no longer holds o.
// The caller asks only on that answer, which the origin gives only to a credential it
// lets delete there; a refused DELETE must not reach it.
func (a *Authorizer) Forget(ctx context.Context, o Object) {
	a.members.drop(ctx, o)
}

// Refused remembers the origin's 401 (its headers, the challenge) to c for o's
// repository, as briefly as an allowance.
func (a *Authorizer) Refused(c Credential, o Object, h http.Header) {
	a.refused.remember(scope(c, o), h)
}

// Challenge returns the origin's recent 401 to c for o's repository, to relay again
// without asking.
func (a *Authorizer) Challenge(c Credential, o Object) (http.Header, bool) {
	return a.refused.get(scope(c, o))
}

// IsMember reports whether the origin said o's repository holds o.
func (a *Authorizer) IsMember(ctx context.Context, o Object) bool { return a.members.has(ctx, o) }

// OfflineAllows is the offline policy for c in o's repository when the origin cannot
// answer: deny says no; recent says yes to an allowance younger than the bound.
func (a *Authorizer) OfflineAllows(c Credential, o Object) bool {
	return a.offlineAllows(scope(c, o))
}

func (a *Authorizer) offlineAllows(own string) bool {
	if a.offline != OfflineRecent {
		return false
	}
	age, ok := a.allow.age(own)
	return ok && age <= a.offlineMaxAge
}

// unanswered reports whether the origin gave no answer to go by: an error, or a 5xx.
func unanswered(ans OriginAnswer) bool { return ans.Err != nil || ans.Status >= 500 }

// whenUnanswered is the decision when the origin could not answer: the offline policy serves
// what is servable (a member, or a repository-wide answer) to a recently allowed
// credential; otherwise the origin's failure is the answer.
func (a *Authorizer) whenUnanswered(servable bool, own string, ans OriginAnswer) Decision {
	if servable && a.offlineAllows(own) {
		return Decision{Verdict: AllowStale, Asked: true}
	}
	if ans.Err != nil {
		return Decision{Verdict: Unavailable, Err: ans.Err, Asked: true}
	}
	return Decision{Verdict: Deny, Status: ans.Status, Header: ans.Header, Asked: true}
}
