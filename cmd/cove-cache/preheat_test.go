package main

import (
	"bytes"
	"net"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

// Bad input gets exit 2 and a message naming what is wrong; an unreachable cache, 1.
func TestPreheatBadInput(t *testing.T) {
	const cache = "http://127.0.0.1:1"
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"ghcr.io/team/app:v1"}, "--cache URL is required"},
		{[]string{"--cache", "ftp://cache", "ghcr.io/team/app:v1"}, "--cache"},
		{[]string{"--cache", "http://cache/path", "ghcr.io/team/app:v1"}, "--cache"},
		{[]string{"--cache", "http://u:p@cache", "ghcr.io/team/app:v1"}, "--cache"},
		{[]string{"--cache", cache}, "no image reference"},
		{[]string{"--cache", cache, "ghcr.io/Team/App:v1"}, `"ghcr.io/Team/App:v1"`},
		{[]string{"--cache", cache, "ghcr.io/team/app:bad tag"}, `"ghcr.io/team/app:bad tag"`},
		{[]string{"--cache", cache, "ghcr.io/team/app@sha256:abc"}, `"ghcr.io/team/app@sha256:abc"`},
		{[]string{"--cache", cache, "--platform", "linux/potato", "ghcr.io/team/app:v1"}, `--platform "linux/potato"`},
		{[]string{"--cache", cache, "--platform", "amd64", "ghcr.io/team/app:v1"}, `--platform "amd64"`},
		{[]string{"--cache", cache, "--platform", "linux/amd64,", "ghcr.io/team/app:v1"}, `--platform ""`},
		{[]string{"--cache", cache, "--platform", "linux/amd64", "--all-platforms", "ghcr.io/team/app:v1"}, "give one"},
		{[]string{"--cache", cache, "--password-stdin", "ghcr.io/team/app:v1"}, "--password-stdin needs --user"},
		{[]string{"--cache", cache, "--user", "alice:pw", "ghcr.io/team/app:v1", "quay.io/team/app:v1"}, "--user REGISTRY/alice"},
		{[]string{"--cache", cache, "--user", "quay.io/alice:pw", "ghcr.io/team/app:v1"}, "no reference names"},
		{[]string{"--cache", cache, "--user", ":pw", "ghcr.io/team/app:v1"}, "empty user name"},
		{[]string{"--cache", cache, "--no-such-flag", "ghcr.io/team/app:v1"}, "no-such-flag"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(append([]string{"preheat"}, tt.args...), &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("preheat %q = %d, stderr %q; want exit 2 mentioning %q", tt.args, code, stderr.String(), tt.want)
		}
	}

	// Nothing listens on a port just closed.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var stdout, stderr bytes.Buffer
	code := run([]string{"preheat", "--cache", "http://" + addr, "ghcr.io/team/app:v1"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "cannot reach the cache at http://"+addr) {
		t.Errorf("unreachable cache: exit %d, stderr %q; want 1 and the cache named", code, stderr.String())
	}
}

func TestPreheatFlagsAfterReferences(t *testing.T) {
	o, err := parsePreheat([]string{"--cache", "https://cove.example/", "ghcr.io/team/app:v1", "--platform", "linux/arm64,linux/amd64", "nginx"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if o.cache.String() != "https://cove.example" || len(o.platforms) != 2 || o.platforms[0].Architecture != "arm64" {
		t.Fatalf("cache %s, platforms %v", o.cache, o.platforms)
	}
	if len(o.targets) != 2 || o.targets[1].Registry != "docker.io" || o.targets[1].Repo != "library/nginx" || o.targets[1].Tag != "latest" {
		t.Fatalf("targets %+v", o.targets)
	}
}

func TestParseLogin(t *testing.T) {
	for _, tt := range []struct {
		in                       string
		registry, user, password string
		hasPassword              bool
	}{
		{"alice", "", "alice", "", false},
		{"alice:pw", "", "alice", "pw", true},
		{"alice:pa/ss:x", "", "alice", "pa/ss:x", true},
		{"team/bot:pw", "", "team/bot", "pw", true},
		{"ghcr.io/team/bot", "ghcr.io", "team/bot", "", false},
		{"127.0.0.1:5000/alice:pw", "127.0.0.1:5000", "alice", "pw", true},
		{"localhost/alice:", "localhost", "alice", "", true},
		{"index.docker.io/alice:pw", "docker.io", "alice", "pw", true},
	} {
		l, err := parseLogin(tt.in)
		if err != nil || l.registry != tt.registry || l.user != tt.user || l.password != tt.password || l.hasPassword != tt.hasPassword {
			t.Errorf("parseLogin(%q) = %+v, %v", tt.in, l, err)
		}
	}
}

// fakeKeychain holds docker-config logins by registry host.
type fakeKeychain map[string]authn.AuthConfig

func (k fakeKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.RegistryStr()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}

// What reaches cove-cache's token broker is always REGISTRY/USER: --user for its own
// registry, else the docker config's login for that registry, else a login to the cache
// bound to that registry; never a login given for another.
func TestPreheatAuthBindsEachLoginToItsRegistry(t *testing.T) {
	kc := fakeKeychain{
		"ghcr.io":           {Username: "gh-user", Password: "gh-pw"},
		"index.docker.io":   {Username: "hub-user", Password: "hub-pw"},
		"cove.example:5005": {Username: "quay.io/q-user", Password: "q-pw"},
	}
	login := &preheatLogin{registry: "registry.corp:5000", user: "ci", password: "ci-pw"}
	auth := preheatAuth(login, kc, "cove.example:5005")
	for _, tt := range []struct {
		registry, user, password string
	}{
		{"registry.corp:5000", "registry.corp:5000/ci", "ci-pw"},
		{"ghcr.io", "ghcr.io/gh-user", "gh-pw"},
		{"docker.io", "docker.io/hub-user", "hub-pw"},
		{"quay.io", "quay.io/q-user", "q-pw"},
		{"evil.example", "", ""},
	} {
		cfg, err := auth(tt.registry).Authorization()
		if err != nil || cfg.Username != tt.user || cfg.Password != tt.password {
			t.Errorf("login for %s: %q/%q (%v), want %q/%q", tt.registry, cfg.Username, cfg.Password, err, tt.user, tt.password)
		}
	}
}
