package content

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"github.com/containerd/containerd/v2/core/content"
	contentproxy "github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Differ serves containerd's diff API (api/services/diff/v1) for a proxy plugin of
// type "diff".
//
// Apply is containerd's own file-system applier (core/diff/apply) reading layers from
// the local store's files: unpacking a layer costs no content RPC at all, where the
// built-in walking differ would read it through the content proxy, 32 KiB per Read.
//
// Diff (Compare: commit, snapshot diff) is containerd's walking differ. Its result must
// land in containerd's namespaced content store (the metadata database must reference
// it, with labels, under a lease), not only in the backend, so it writes through
// containerd's own content and lease APIs at ContainerdAddress, in the caller's
// namespace (see DiffLeaseExpiration for the lease). Without that address Diff answers
// Unimplemented, which containerd's diff service treats as "try the next differ"
// (plugins/services/diff/local.go) and the built-in walking differ computes it.
type Differ struct {
	diffapi.UnimplementedDiffServer

	applier diff.Applier
	log     *slog.Logger

	connMu     sync.Mutex
	containerd string // guarded by connMu
	conn       *grpc.ClientConn

	applies, applyErrors, diffs atomic.Int64
	applyNanos                  atomic.Int64
}

// NewDiffer returns a diff server applying layers from store. containerdAddress is
// containerd's gRPC socket, used by Diff only; empty disables Diff.
func NewDiffer(store content.Provider, containerdAddress string, logger *slog.Logger) *Differ {
	if logger == nil {
		logger = slog.Default()
	}
	return &Differ{
		applier:    apply.NewFileSystemApplier(store),
		containerd: containerdAddress,
		log:        logger,
	}
}

// Apply unpacks the layer req.Diff onto req.Mounts.
func (d *Differ) Apply(ctx context.Context, req *diffapi.ApplyRequest) (*diffapi.ApplyResponse, error) {
	if req.Diff == nil {
		return nil, status.Error(codes.InvalidArgument, "cove: apply request without a diff descriptor")
	}
	start := time.Now()
	desc := oci.DescriptorFromProto(req.Diff)
	mounts := mount.FromProto(req.Mounts)
	var opts []diff.ApplyOpt
	if req.Payloads != nil {
		payloads := make(map[string]typeurl.Any, len(req.Payloads))
		for k, v := range req.Payloads {
			payloads[k] = v
		}
		opts = append(opts, diff.WithPayloads(payloads))
	}
	opts = append(opts, diff.WithSyncFs(req.SyncFs))
	applied, err := d.applier.Apply(ctx, desc, mounts, opts...)
	d.applies.Add(1)
	d.applyNanos.Add(int64(time.Since(start)))
	if err != nil {
		d.applyErrors.Add(1)
		d.log.Warn("diff apply failed", "digest", desc.Digest, "error", err)
		return nil, errgrpc.ToGRPC(err)
	}
	d.log.Debug("diff applied", "digest", desc.Digest, "size", desc.Size, "took", time.Since(start))
	return &diffapi.ApplyResponse{Applied: oci.DescriptorToProto(applied)}, nil
}

// DiffLeaseExpiration is how long a layer computed by Diff is kept by the lease Diff
// creates for it, the same expiration containerd's client gives its own leases
// (client/lease.go, WithLease). containerd does not forward the caller's lease to a
// proxy differ (only the namespace arrives), so without a lease of its own the new
// blob is referenced by nothing and the next GC deletes it before the caller can use
// it (seen in tests). The caller references it from its image or its own lease
// within that time; the lease then expires and GC drops only what nothing else holds.
var DiffLeaseExpiration = 24 * time.Hour

// Diff computes the difference between req.Left and req.Right with the walking differ
// and stores it in containerd's content store, in the caller's namespace, under the
// caller's lease if containerd forwarded one, else under a new lease that expires
// after DiffLeaseExpiration.
func (d *Differ) Diff(ctx context.Context, req *diffapi.DiffRequest) (*diffapi.DiffResponse, error) {
	conn, err := d.containerdConn()
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if conn == nil {
		return nil, status.Error(codes.Unimplemented, "cove: diff (compare) needs containerd's address; use the built-in walking differ")
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	out := namespaces.WithNamespace(ctx, ns) // outgoing: containerd's API wants it too
	lm := leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn))
	lid, ok := leases.FromContext(ctx)
	if !ok {
		l, err := lm.Create(out, leases.WithRandomID(), leases.WithExpiration(DiffLeaseExpiration),
			leases.WithLabel("io.cove.node/diff", time.Now().UTC().Format(time.RFC3339)))
		if err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("lease for the diff: %w", err))
		}
		lid = l.ID
	}
	out = leases.WithLease(out, lid)

	var opts []diff.Opt
	if req.MediaType != "" {
		opts = append(opts, diff.WithMediaType(req.MediaType))
	}
	if req.Ref != "" {
		opts = append(opts, diff.WithReference(req.Ref))
	}
	if req.Labels != nil {
		opts = append(opts, diff.WithLabels(req.Labels))
	}
	if req.SourceDateEpoch != nil {
		tm := req.SourceDateEpoch.AsTime()
		opts = append(opts, diff.WithSourceDateEpoch(&tm))
	}
	d.diffs.Add(1)
	cs := contentproxy.NewContentStore(conn)
	differ := walking.NewWalkingDiff(cs)
	left, right := mount.FromProto(req.Left), mount.FromProto(req.Right)
	for attempt := 0; ; attempt++ {
		desc, err := differ.Compare(out, left, right, opts...)
		if err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		// If the same blob already existed, containerd's content service answered the
		// commit with AlreadyExists without committing
		// (plugins/services/content/contentserver, Write: Expected), so the blob was
		// never added to the lease, and a GC already under way (say, after the lease
		// of the request that made it went away) deletes it. Lease it explicitly, then
		// check it is still there; if it went in between, compute it once more.
		if err := lm.AddResource(out, leases.Lease{ID: lid}, leases.Resource{ID: desc.Digest.String(), Type: "content"}); err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("lease the diff %s: %w", desc.Digest, err))
		}
		if _, err := cs.Info(out, desc.Digest); err == nil {
			return &diffapi.DiffResponse{Diff: oci.DescriptorToProto(desc)}, nil
		} else if !errdefs.IsNotFound(err) || attempt > 0 {
			return nil, errgrpc.ToGRPC(err)
		}
		d.log.Debug("diff deleted by a concurrent GC before it was leased; computing it again", "digest", desc.Digest)
	}
}

// containerdConn is a connection to containerd's own API (its namespaced,
// metadata-backed content store and its leases), nil without containerd's address.
func (d *Differ) containerdConn() (*grpc.ClientConn, error) {
	d.connMu.Lock()
	defer d.connMu.Unlock()
	if d.containerd == "" {
		return nil, nil
	}
	if d.conn == nil {
		conn, err := grpc.NewClient(dialer.DialAddress(d.containerd),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(dialer.ContextDialer),
			grpc.WithDefaultCallOptions(
				grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize),
				grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)))
		if err != nil {
			return nil, fmt.Errorf("containerd %s: %w", d.containerd, err)
		}
		d.conn = conn
	}
	return d.conn, nil
}

// Close closes the connection to containerd, if any.
func (d *Differ) Close() error {
	d.connMu.Lock()
	defer d.connMu.Unlock()
	if d.conn == nil {
		return nil
	}
	err := d.conn.Close()
	d.conn = nil
	return err
}

// setContainerdAddress sets containerd's address (tests start containerd after the hook).
func (d *Differ) setContainerdAddress(addr string) {
	d.connMu.Lock()
	defer d.connMu.Unlock()
	d.containerd = addr
}
