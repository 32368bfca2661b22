package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"net/http"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cove-oci/cove/proxy/server"
)

// A replica taken out of service (rolling update, node drain, scale-in) gets SIGTERM.
// containerd never falls back in the middle of a body, so a replica that broke its
// transfers at once would fail pulls. Instead it drains, in two bounded phases:
//
//  1. grace (--shutdown-grace): /readyz answers 503 at once, so Kubernetes takes the
//     pod out of the Service and the other replicas drop it from their membership, and
//     the other replicas are told directly (they start no new fill here and join the
//     fills running here: docs/scaleout.md); until
//     that has reached every kube-proxy and client, requests keep arriving, and every
//     one, new or in flight, is served. Keep-alives are switched off so clients dial
//     again (through the Service, to a ready replica) after each answer.
//  2. shutdown (--shutdown-timeout): the listener closes; requests in flight and fills
//     (which run on their own context, whoever still reads them) finish, up to the bound.
//     A replica of several first keeps its listener while its fills run, serving only
//     the replicas that join them (every other request gets 503), then closes it.
//
// The pod's terminationGracePeriodSeconds must cover both phases and a little more, or
// the kubelet's SIGKILL cuts the second. A second SIGTERM or SIGINT ends the current
// phase early (an impatient operator's Ctrl-C twice).

// drainOptions are the flags of the drain.
type drainOptions struct {
	grace   time.Duration
	timeout time.Duration
}

func (o *drainOptions) register(fs *flag.FlagSet) {
	fs.DurationVar(&o.grace, "shutdown-grace", 25*time.Second, "on SIGTERM, fail /readyz at once and keep serving everything, new requests too, for this long before closing the listener: the time the Service needs to stop sending requests here (Kubernetes: at least the readiness probe period times its failure threshold, plus a few seconds); 0 closes at once")
	fs.DurationVar(&o.timeout, "shutdown-timeout", 15*time.Second, "after --shutdown-grace, wait this long at most for requests in flight and fills to finish; terminationGracePeriodSeconds must exceed the two added")
}

func (o *drainOptions) validate() error {
	if o.grace < 0 || o.timeout <= 0 {
		return errors.New("--shutdown-grace must be >= 0 and --shutdown-timeout > 0")
	}
	return nil
}

// drain takes the server out of service after the signal first (see above) and reports
// whether everything in flight finished within the bounds. more delivers later signals;
// served is the Serve loop's result (a server that dies while draining ends the drain).
func drain(hs *http.Server, srv *server.Server, o drainOptions, first os.Signal, more <-chan os.Signal, served <-chan error, log *slog.Logger) bool {
	name := first.String()
	if sig, ok := first.(syscall.Signal); ok {
		name = unix.SignalName(sig) // SIGTERM, as people and kubectl name it
	}
	srv.Drain(name + " received")
	// The other replicas learn at once that this one leaves, before the Service or the
	// EndpointSlices do: they start no new fill here and join the ones running here
	// rather than fetch those blobs again (docs/scaleout.md). In the background: the
	// grace runs meanwhile; each notice is bounded.
	go srv.AnnounceLeaving(context.Background(), o.grace+o.timeout)
	hs.SetKeepAlivesEnabled(false)
	log.Info("draining: /readyz fails, still serving", "signal", name, "shutdown_grace", o.grace,
		"shutdown_timeout", o.timeout, "fills_in_flight", srv.Fills().InFlight())

	grace := time.NewTimer(o.grace)
	defer grace.Stop()
	select {
	case <-grace.C:
	case sig := <-more:
		log.Warn("second signal: ending the drain's grace early", "signal", sig.String())
	case err := <-served:
		log.Error("server stopped while draining", "error", err)
		return false
	}

	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	go func() {
		select {
		case sig := <-more:
			log.Warn("second signal: cutting what is still in flight", "signal", sig.String())
			cancel()
		case <-ctx.Done():
		}
	}()
	if srv.CloseToClients() {
		// A replica of several keeps its listener while its fills run, for the replicas
		// that join them rather than fetch those blobs again; everything else is refused.
		log.Info("grace over: refusing clients, serving the replicas joining the fills still running here",
			"fills_in_flight", srv.Fills().InFlight())
		waitFills(ctx, srv)
	}
	log.Info("closing the listener, waiting for requests and fills in flight")
	if err := hs.Shutdown(ctx); err != nil {
		log.Warn("shutdown incomplete: requests still in flight were cut", "error", err)
		return false
	}
	// Fills outlive the requests that started them (a client may have gone): let them
	// finish and commit, so no origin fetch is wasted and nothing half-done is left.
	if !waitFills(ctx, srv) {
		log.Warn("shutdown incomplete: fills still in flight were cut",
			"fills_in_flight", srv.Fills().InFlight(), "pending_stores", srv.PendingStores())
		return false
	}
	log.Info("drained: nothing in flight")
	return true
}

// waitFills waits until no fill is in flight and no store pending, and reports whether
// that happened before ctx ended.
func waitFills(ctx context.Context, srv *server.Server) bool {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for srv.Fills().InFlight() > 0 || srv.PendingStores() > 0 {
		select {
		case <-tick.C:
		case <-ctx.Done():
			return false
		}
	}
	return true
}
