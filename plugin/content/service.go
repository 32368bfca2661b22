// Package content is cove-node's content hook: one gRPC server on a unix socket that
// containerd uses as two proxy plugins, its content store and its differ.
//
//   - Content: containerd's content API (contentserver) over containerd's own local
//     store (plugins/content/local) on the built-in plugin's directory, so the hook can
//     be switched off or on without losing a blob, and cove-node can put blobs into the
//     store (Store.Prefill) before containerd asks for them. Prefilled blobs are
//     protected from containerd's GC for a while (Store.Protect).
//   - Diff: containerd's diff API with containerd's own file-system applier reading the
//     local files, so unpacking costs no content RPC (a naive content proxy makes
//     unpack read every layer 32 KiB per RPC, FIELD-NOTES §1).
//
// containerd is configured with Fragment.
package content

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/plugins/services/content/contentserver"
	"github.com/coreos/go-systemd/v22/activation"
	digest "github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config configures the content hook.
type Config struct {
	// Root is the content store directory: containerd's built-in store's own,
	// <containerd root>/io.containerd.content.v1.content.
	Root string
	// Socket is the unix socket containerd's proxy plugins dial (proxy_plugins address).
	// When the process was started by systemd socket activation, the inherited socket
	// is served instead (the one whose address is Socket, else the first unix socket).
	Socket string
	// Listener, if set, is served instead of Socket and socket activation (for a caller
	// that does socket activation itself for several parts). Service.Activated then
	// reports true: the socket belongs to the caller and is not removed on Close.
	Listener net.Listener
	// ContainerdAddress is containerd's own gRPC socket (e.g.
	// /run/containerd/containerd.sock). Only the Diff (compare) RPC uses it; empty
	// makes Diff answer Unimplemented.
	ContainerdAddress string
	// Logger receives the hook's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Service is the running content hook: content and diff APIs on one socket.
type Service struct {
	store     *Store
	differ    *Differ
	srv       *grpc.Server
	ln        net.Listener
	activated bool
	log       *slog.Logger
	done      chan struct{}
	serveErr  error
	closeOnce sync.Once
}

// New opens the store at cfg.Root and serves it with a differ on cfg.Socket (or the
// socket-activated listener).
func New(cfg Config) (*Service, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	store, err := NewStore(cfg.Root, cfg.Logger)
	if err != nil {
		return nil, err
	}
	return Serve(cfg, store, NewDiffer(store, cfg.ContainerdAddress, cfg.Logger))
}

// Serve serves store (content API) and, if differ is not nil, differ (diff API) on
// cfg.Socket or the socket-activated listener. cfg.Root is not used.
func Serve(cfg Config, store *Store, differ *Differ) (*Service, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ln, activated := cfg.Listener, true
	if ln == nil {
		var err error
		if ln, activated, err = Listen(cfg.Socket); err != nil {
			return nil, err
		}
	}
	s := &Service{
		store:     store,
		differ:    differ,
		ln:        ln,
		activated: activated,
		log:       cfg.Logger,
		done:      make(chan struct{}),
	}
	s.srv = grpc.NewServer(
		grpc.MaxRecvMsgSize(defaults.DefaultMaxRecvMsgSize),
		grpc.MaxSendMsgSize(defaults.DefaultMaxSendMsgSize),
		grpc.ChainUnaryInterceptor(recoverUnary(cfg.Logger)),
		grpc.ChainStreamInterceptor(recoverStream(cfg.Logger)),
	)
	contentapi.RegisterContentServer(s.srv, contentserver.New(store))
	if differ != nil {
		diffapi.RegisterDiffServer(s.srv, differ)
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			s.serveErr = err
			s.log.Error("content hook server stopped", "error", err)
		}
	}()
	s.log.Info("content hook serving", "socket", ln.Addr().String(), "socket_activated", activated,
		"root", store.Root(), "diff", differ != nil)
	return s, nil
}

// Store is the content store the service serves.
func (s *Service) Store() *Store { return s.store }

// Differ is the diff server, nil when the service serves content only.
func (s *Service) Differ() *Differ { return s.differ }

// Protect protects dgst from containerd's GC until the given time (Store.Protect).
func (s *Service) Protect(dgst digest.Digest, until time.Time) { s.store.Protect(dgst, until) }

// Addr is the socket path served.
func (s *Service) Addr() string { return s.ln.Addr().String() }

// Activated reports whether the socket came from systemd socket activation.
func (s *Service) Activated() bool { return s.activated }

// Stats are counters for metrics.
type Stats struct {
	Applies, ApplyErrors int64         // diff Apply calls, and how many failed
	ApplyTime            time.Duration // total time spent in Apply
	Diffs                int64         // diff Diff (compare) calls
	Deletes              int64         // blob deletes passed to the store
	ProtectedDeletes     int64         // blob deletes skipped because the blob was protected
}

// Stats returns the counters so far.
func (s *Service) Stats() Stats {
	st := Stats{
		Deletes:          s.store.deletes.Load(),
		ProtectedDeletes: s.store.protectedDeletes.Load(),
	}
	if d := s.differ; d != nil {
		st.Applies, st.ApplyErrors = d.applies.Load(), d.applyErrors.Load()
		st.ApplyTime = time.Duration(d.applyNanos.Load())
		st.Diffs = d.diffs.Load()
	}
	return st
}

// Close stops serving: in-flight calls get 5 s to finish, then are cut. A socket the
// service created is removed; an activated one stays with systemd, which queues
// containerd's next connections until the service is back.
func (s *Service) Close() error {
	s.closeOnce.Do(func() {
		stopped := make(chan struct{})
		go func() { s.srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			s.srv.Stop()
		}
		<-s.done
		if s.differ != nil {
			_ = s.differ.Close()
		}
	})
	return s.serveErr
}

// Listen returns the socket-activated unix listener if systemd (or anything that sets
// LISTEN_FDS/LISTEN_PID the same way) passed one, else a new unix socket at path:
// a stale socket file is removed first, the parent directory is created with mode 0700
// and the socket gets mode 0660.
func Listen(path string) (ln net.Listener, activated bool, err error) {
	if ln := activatedListener(path); ln != nil {
		return ln, true, nil
	}
	if path == "" {
		return nil, false, errors.New("content: no socket path and no socket-activated listener")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, err
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, false, err
	}
	ln, err = net.Listen("unix", path)
	if err != nil {
		return nil, false, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, false, err
	}
	return ln, false, nil
}

// removeStaleSocket removes path if it is a socket nobody answers on. A live socket is
// an error: another cove-node is serving it.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("content: %s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("content: %s is in use by another process", path)
	}
	return os.Remove(path)
}

var (
	activationOnce sync.Once
	activationLns  []net.Listener
	activationMu   sync.Mutex
)

// activatedListener hands out the inherited unix listener for path (or the first unix
// listener if none has that address). go-systemd's activation reads LISTEN_FDS once
// per process (it unsets the variables), so the listeners are taken once and kept.
func activatedListener(path string) net.Listener {
	activationOnce.Do(func() {
		lns, err := activation.Listeners()
		if err == nil {
			activationLns = lns
		}
	})
	activationMu.Lock()
	defer activationMu.Unlock()
	pick := -1
	for i, l := range activationLns {
		if l == nil || l.Addr().Network() != "unix" {
			continue
		}
		if l.Addr().String() == path {
			pick = i
			break
		}
		if pick < 0 {
			pick = i
		}
	}
	if pick < 0 {
		return nil
	}
	l := activationLns[pick]
	activationLns[pick] = nil
	return l
}

func recoverUnary(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				err = panicked(log, info.FullMethod, r)
			}
		}()
		return handler(ctx, req)
	}
}

func recoverStream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = panicked(log, info.FullMethod, r)
			}
		}()
		return handler(srv, ss)
	}
}

func panicked(log *slog.Logger, method string, r any) error {
	log.Error("panic in content hook handler", "method", method, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	return status.Errorf(codes.Internal, "cove content hook: panic in %s: %v", method, r)
}
