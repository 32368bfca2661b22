package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestInstallSubcommandsRefuseBadFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"install", "--frobnicate"}, "unknown argument '--frobnicate'"},
		{[]string{"install", "--root-dir", dir, "--no-restart"}, "--cache URL is required"},
		{[]string{"install", "--root-dir", dir, "--no-restart", "--cache", "http://c:5005", "--cache-ca="}, "--cache-ca needs a file"},
		{[]string{"install", "--root-dir", dir, "--cache", "http://c:5005"}, "add --no-restart"},
		{[]string{"install", "--host-root", dir, "--cache", "http://c:5005"}, "--systemctl"},
		{[]string{"install", "--root-dir", dir, "--no-restart", "--cache", "http://c:5005", "stray"}, "unknown argument 'stray'"},
		{[]string{"install", "--cache"}, "needs a value"},
		{[]string{"install", "--root-dir", dir, "--no-restart", "--cache", "http://c:5005", "--metrics-addr", "10.0.0.1"}, "--metrics-addr '10.0.0.1': want HOST:PORT"},
		{[]string{"install", "--root-dir", dir, "--no-restart", "--cache", "http://c:5005", "--metrics-addr", "127.0.0.1:5006"}, "its own port"},
		{[]string{"uninstall", "--cache", "http://c:5005"}, "uninstall takes only"},
		{[]string{"uninstall", "--content-hook"}, "uninstall takes only"},
		{[]string{"uninstall", "--root-dir", dir}, "--no-restart"},
		{[]string{"doctor", "--nope"}, "unknown argument"},
		{[]string{"doctor", "--root-dir", dir, "--host-root", dir}, "give one"},
	} {
		var out, errb bytes.Buffer
		if code := run(tt.args, &out, &errb); code != 2 || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("run(%q) = %d, %q; want 2 mentioning %q", tt.args, code, errb.String(), tt.want)
		}
	}
}

func TestInstallHelp(t *testing.T) {
	for _, cmd := range []string{"install", "uninstall", "doctor"} {
		var out, errb bytes.Buffer
		if code := run([]string{cmd, "-h"}, &out, &errb); code != 0 || !strings.Contains(errb.String(), "Usage") || !strings.Contains(errb.String(), "-root-dir") {
			t.Errorf("%s -h: %d %q", cmd, code, errb.String())
		}
	}
}

// install --metrics-addr takes the node's address, bracketed or not (the DaemonSet
// writes [$(NODE_IP)]:5007, for IPv4 and IPv6 nodes alike).
func TestInstallTakesMetricsAddr(t *testing.T) {
	var errb bytes.Buffer
	for _, a := range []string{"10.1.2.3:5007", "[10.1.2.3]:5007", "[fd00::3]:5007", "0.0.0.0:5007"} {
		o, err := parseInstall([]string{"--root-dir", t.TempDir(), "--no-restart", "--cache", "http://c:5005", "--metrics-addr=" + a}, &errb)
		if err != nil || o.MetricsAddr != a {
			t.Errorf("install --metrics-addr=%s: %+v, %v", a, o, err)
		}
	}
}
