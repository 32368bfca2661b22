package nodeinstall

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	introspection "github.com/containerd/containerd/api/services/introspection/v1"
	versionapi "github.com/containerd/containerd/api/services/version/v1"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"
)

// checkDaemon asks the running containerd its version, and whether it started after its
// configuration last changed (containerd reads config.toml and its imports at start only).
func (d *doctor) checkDaemon(ctx context.Context) {
	addr := d.ContainerdAddress
	if addr == "" {
		addr = grpcAddress(d.cfg)
	}
	if addr == "" {
		addr = ctdDefaultSocket
	}
	sock := d.fileOfConf(addr)
	ctx, cancel := context.WithTimeout(ctx, d.Timeout)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err == nil {
		defer conn.Close()
	}
	var v *versionapi.VersionResponse
	if err == nil {
		v, err = versionapi.NewVersionClient(conn).Version(ctx, &emptypb.Empty{})
	}
	if err != nil {
		d.add("containerd", Fail, fmt.Sprintf("no containerd answers on %s (%v): nothing pulls on this node", sock, err),
			"start containerd (systemctl status containerd; journalctl -u containerd), or pass --containerd-address")
		return
	}
	major, minor, ok := ParseVersion(v.Version)
	switch {
	case !ok:
		d.add("containerd", Warn, fmt.Sprintf("containerd on %s says version %q, which does not read as one", sock, v.Version), "")
	case major < 2:
		d.add("containerd", Fail, fmt.Sprintf("containerd %s on %s: 1.x is not supported (its drop-ins replace whole plugin sections)", v.Version, sock),
			"upgrade containerd to 2.x, then run cove-node install")
	default:
		d.add("containerd", OK, fmt.Sprintf("containerd %s (%d.%d) answers on %s", v.Version, major, minor, sock), "")
	}
	srv, err := introspection.NewIntrospectionClient(conn).Server(ctx, &emptypb.Empty{})
	if err != nil {
		return
	}
	started, ok := processStart(srv.Pid, srv.Pidns)
	if !ok {
		return
	}
	var newest string
	var newestT time.Time
	for _, f := range d.files {
		if st, err := os.Stat(f); err == nil && st.ModTime().After(newestT) {
			newest, newestT = f, st.ModTime()
		}
	}
	// Clock ticks make start times coarse: a second of slack.
	if newest != "" && newestT.After(started.Add(time.Second)) {
		d.add("containerd restart", Fail, fmt.Sprintf("containerd (pid %d) started %s, before %s changed (%s): it runs on the old configuration",
			srv.Pid, started.Format(time.RFC3339), newest, newestT.Format(time.RFC3339)), "systemctl restart containerd")
	}
}

// processStart is when process pid started, if it is in this process's PID namespace.
func processStart(pid, pidns uint64) (time.Time, bool) {
	var st struct{ ino uint64 }
	if fi, err := os.Stat("/proc/self/ns/pid"); err == nil {
		if s, ok := statIno(fi); ok {
			st.ino = s
		}
	}
	if st.ino == 0 || st.ino != pidns {
		return time.Time{}, false
	}
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.FormatUint(pid, 10), "stat"))
	if err != nil {
		return time.Time{}, false
	}
	// The fields after the command name (which may hold spaces) in parentheses; starttime
	// is field 22 of the line, in clock ticks since boot (USER_HZ, 100 on Linux).
	rest := string(stat)
	if i := strings.LastIndexByte(rest, ')'); i >= 0 {
		rest = rest[i+1:]
	}
	f := strings.Fields(rest)
	if len(f) < 20 {
		return time.Time{}, false
	}
	ticks, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	boot, ok := bootTime()
	if !ok {
		return time.Time{}, false
	}
	return boot.Add(time.Duration(ticks) * (time.Second / 100)), true
}

func bootTime() (time.Time, bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return time.Unix(n, 0), err == nil
		}
	}
	return time.Time{}, false
}

// checkCoveNode probes cove-node where hosts.toml sends containerd: /healthz answers, the
// resolver endpoint answers /v2/ as a registry does, and its metrics say whether it
// reaches cove-cache.
func (d *doctor) checkCoveNode(ctx context.Context) {
	const name = "cove-node"
	base := "http://" + d.Addr
	client := &http.Client{Timeout: d.Timeout}
	get := func(path string) ([]byte, http.Header, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err != nil {
			return nil, nil, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return nil, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s", resp.Status)
		}
		return b, resp.Header, err
	}
	if _, _, err := get("/healthz"); err != nil {
		d.add(name, Fail, fmt.Sprintf("cove-node does not answer on %s (%v; address from %s): containerd skips the mirror and pulls every image from its registry", base, err, d.addrFrom),
			"systemctl status cove-node; journalctl -u cove-node")
		return
	}
	// The resolver endpoint itself, as containerd reaches it: a registry's /v2/.
	if _, h, err := get("/v2/"); err != nil || h.Get("Docker-Distribution-Api-Version") != "registry/2.0" {
		d.add(name, Fail, fmt.Sprintf("%s answers /healthz, but its /v2/ is no registry endpoint (%v): is something else listening there?", base, err),
			"check what listens on "+d.Addr+" (ss -ltnp) and cove-node's --addr")
		return
	}
	b, _, err := get("/metrics")
	if err != nil {
		d.add(name, Warn, fmt.Sprintf("cove-node answers /healthz on %s but not /metrics (%v)", base, err), "")
		return
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(b)))
	if err != nil {
		d.add(name, Warn, fmt.Sprintf("cove-node's /metrics on %s does not parse (%v): is it cove-node?", base, err), "")
		return
	}
	served := map[string]float64{}
	if f := fams["cove_node_requests_total"]; f != nil {
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == "served_by" {
					served[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	detail := fmt.Sprintf("cove-node answers on %s (/healthz, and /v2/ as a registry); requests so far: cache %g, prefill %g, origin %g, handoff %g",
		base, served["cache"], served["prefill"], served["origin"], served["handoff"])
	if f := fams["cove_node_caches_bypassed"]; f != nil && len(f.Metric) > 0 && f.Metric[0].GetGauge().GetValue() > 0 {
		d.add(name, Warn, fmt.Sprintf("%s; %g cove-cache endpoint(s) bypassed (circuit breaker open): pulls go to the origin", detail, f.Metric[0].GetGauge().GetValue()),
			"check cove-cache (its /healthz, and the --cache URLs in "+UnitPath+")")
		return
	}
	d.add(name, OK, detail, "")
}

// checkMetricsListener probes the installed unit's --metrics-addr, where Prometheus
// scrapes cove-node: a warning, not a failure, when it does not answer (pulls do not
// depend on it). No line without one.
func (d *doctor) checkMetricsListener(ctx context.Context) {
	if d.metricsAddr == "" {
		return
	}
	const name = "metrics"
	host, port, err := net.SplitHostPort(d.metricsAddr)
	if err != nil {
		d.add(name, Warn, fmt.Sprintf("%s names --metrics-addr %q, which is no HOST:PORT", UnitPath, d.metricsAddr), "run cove-node install again with a HOST:PORT")
		return
	}
	switch host {
	case "0.0.0.0", "":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	u := "http://" + net.JoinHostPort(host, port) + "/metrics"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		d.add(name, Warn, fmt.Sprintf("%s: %v", u, err), "")
		return
	}
	err = scrapeCoveNode((&http.Client{Timeout: d.Timeout}), req)
	if err != nil {
		d.add(name, Warn, fmt.Sprintf("cove-node's metrics listener (--metrics-addr %s in %s) does not serve /metrics at %s (%v): scrapers get no cove-node metrics", d.metricsAddr, UnitPath, u, err),
			"journalctl -u cove-node (metrics listener), and check the address is this node's")
		return
	}
	d.add(name, OK, fmt.Sprintf("cove-node serves /metrics for scrapers at %s (--metrics-addr %s)", u, d.metricsAddr), "")
}

// scrapeCoveNode GETs req and checks that the answer is cove-node's metrics.
func scrapeCoveNode(c *http.Client, req *http.Request) error {
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return errors.New(resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return err
	}
	if fams["cove_node_caches_bypassed"] == nil {
		return errors.New("no cove_node_caches_bypassed metric: is it cove-node?")
	}
	return nil
}
