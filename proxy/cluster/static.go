package cluster

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strings"
)

// Static is a fixed membership: the --peer list. It never changes.
type Static struct {
	members []string
	never   chan struct{}
}

// NewStatic returns the membership of urls, each checked and normalized by ParseMember.
func NewStatic(urls []string) (*Static, error) {
	if len(urls) == 0 {
		return nil, fmt.Errorf("cluster: no members")
	}
	members := make([]string, 0, len(urls))
	for _, u := range urls {
		m, err := ParseMember(u)
		if err != nil {
			return nil, err
		}
		members = append(members, m)
	}
	slices.Sort(members)
	return &Static{members: slices.Compact(members), never: make(chan struct{})}, nil
}

// Members returns the list (sorted, without duplicates); the caller must not change it.
func (s *Static) Members() []string { return s.members }

// Changed returns a channel that is never closed.
func (s *Static) Changed() <-chan struct{} { return s.never }

// Run returns at once: there is nothing to keep current.
func (s *Static) Run(context.Context) error { return nil }

// ParseMember checks that u is a member URL, scheme://host:port and nothing more, and
// returns it in the one form every replica compares (lower-case scheme and host, no
// trailing slash): the owner of a digest is computed from these strings, so two replicas
// spelling one member differently would disagree on owners.
func ParseMember(u string) (string, error) {
	p, err := url.Parse(u)
	if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" || p.Port() == "" ||
		p.User != nil || (p.Path != "" && p.Path != "/") || p.RawQuery != "" || p.Fragment != "" {
		return "", fmt.Errorf("cluster: member %q: want http(s)://HOST:PORT and nothing more", u)
	}
	return strings.ToLower(p.Scheme) + "://" + strings.ToLower(p.Host), nil
}
