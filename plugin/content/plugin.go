package content

import (
	"errors"
	"fmt"

	"github.com/containerd/plugin"
)

// Plugin types of the content hook's parts, registered the way cove-node registers its
// other parts (github.com/containerd/plugin).
const (
	// TypeContent is the content store (*Store): ID "local".
	TypeContent plugin.Type = "io.cove.node.content.v1"
	// TypeDiff is the diff server (*Differ): ID "apply".
	TypeDiff plugin.Type = "io.cove.node.diff.v1"
	// TypeGRPC is the gRPC server on the hook's socket (*Service): ID "content".
	TypeGRPC plugin.Type = "io.cove.node.grpc.v1"
)

// ErrNotConfigured is wrapped in the skip error when the hook has no store root.
var ErrNotConfigured = errors.New("content hook not configured (no content root)")

// Registrations returns the hook's parts: the store, the differ (requires the store)
// and the socket server (requires both; serves content only if the differ is
// disabled). config extracts the hook's configuration from the init context, since the
// caller owns ic.Config's type. An empty Config.Root skips all three
// (plugin.ErrSkipPlugin). The server's instance (*Service) must be closed on shutdown.
func Registrations(config func(*plugin.InitContext) Config) []*plugin.Registration {
	return []*plugin.Registration{
		{
			Type: TypeContent,
			ID:   "local",
			InitFn: func(ic *plugin.InitContext) (any, error) {
				cfg := config(ic)
				if cfg.Root == "" {
					return nil, fmt.Errorf("%w: %w", ErrNotConfigured, plugin.ErrSkipPlugin)
				}
				ic.Meta.Exports["root"] = cfg.Root
				return NewStore(cfg.Root, cfg.Logger)
			},
		},
		{
			Type:     TypeDiff,
			ID:       "apply",
			Requires: []plugin.Type{TypeContent},
			InitFn: func(ic *plugin.InitContext) (any, error) {
				cfg := config(ic)
				s, err := ic.GetSingle(TypeContent)
				if err != nil {
					return nil, fmt.Errorf("%w: %w", err, plugin.ErrSkipPlugin)
				}
				return NewDiffer(s.(*Store), cfg.ContainerdAddress, cfg.Logger), nil
			},
		},
		{
			Type:     TypeGRPC,
			ID:       "content",
			Requires: []plugin.Type{TypeContent, TypeDiff},
			InitFn: func(ic *plugin.InitContext) (any, error) {
				cfg := config(ic)
				s, err := ic.GetSingle(TypeContent)
				if err != nil {
					return nil, fmt.Errorf("%w: %w", err, plugin.ErrSkipPlugin)
				}
				var differ *Differ
				if d, err := ic.GetSingle(TypeDiff); err == nil {
					differ = d.(*Differ)
				}
				svc, err := Serve(cfg, s.(*Store), differ)
				if err != nil {
					return nil, err
				}
				ic.Meta.Exports["address"] = svc.Addr()
				return svc, nil
			},
		},
	}
}
