package authz

import (
	"context"
	"strings"

	"github.com/containerd/errdefs"
)

// Records is the small part of the storage driver memberships live in.
type Records interface {
	PutRecord(ctx context.Context, key string, value []byte) error
	GetRecord(ctx context.Context, key string) ([]byte, error)
	DeleteRecord(ctx context.Context, key string) error
}

// Membership records: membership/<registry>/<repository>/@<alg>:<hex>, written only on
// the origin's 200 for that digest in that repository. (Stores written before this rule
// kept member/... records learned from manifest listings; they are not read.)
type members struct {
	records Records
	onError func(op string, err error)
}

// KeyRegistry is a registry host as a record key segment: IPv6 literals carry brackets,
// which keys do not allow; '+' never appears in hosts.
func KeyRegistry(registry string) string {
	return strings.NewReplacer("[", "+", "]", "+").Replace(registry)
}

func memberKey(o Object) string {
	return "membership/" + KeyRegistry(o.Registry) + "/" + o.Repository + "/@" + o.Digest.Algorithm().String() + ":" + o.Digest.Encoded()
}

func (m members) has(ctx context.Context, o Object) bool {
	if o.Digest.Validate() != nil {
		return false
	}
	_, err := m.records.GetRecord(ctx, memberKey(o))
	return err == nil
}

func (m members) add(ctx context.Context, o Object) {
	if o.Digest.Validate() != nil || m.has(ctx, o) {
		return
	}
	if err := m.records.PutRecord(ctx, memberKey(o), nil); err != nil {
		m.onError("add", err)
	}
}

func (m members) drop(ctx context.Context, o Object) {
	if o.Digest.Validate() != nil {
		return
	}
	if err := m.records.DeleteRecord(ctx, memberKey(o)); err != nil && !errdefs.IsNotFound(err) {
		m.onError("drop", err)
	}
}
