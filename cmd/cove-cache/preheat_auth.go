package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"golang.org/x/term"

	"github.com/cove-oci/cove/proxy/route"
)

// preheatLogin is the --user login, bound to one registry as cove-cache's token broker
// binds logins (docs/security.md): "REGISTRY/USER" names it, a plain "USER" is for the
// one registry the references name.
type preheatLogin struct {
	registry, user, password string
	hasPassword              bool
}

// parseLogin reads --user [REGISTRY/]USER[:PASSWORD]. The registry element is the first
// one when it has a dot, a port or is localhost, as in an image reference.
func parseLogin(s string) (preheatLogin, error) {
	var l preheatLogin
	if first, rest, found := strings.Cut(s, "/"); found && looksLikeRegistry(first) {
		reg, err := route.NormalizeHost(first)
		if err != nil {
			return l, fmt.Errorf("--user: %q is not a registry host", first)
		}
		l.registry, s = reg, rest
	}
	l.user, l.password, l.hasPassword = strings.Cut(s, ":")
	if l.user == "" {
		return l, errors.New("--user: empty user name")
	}
	return l, nil
}

func looksLikeRegistry(first string) bool {
	host := first
	if h, _, err := net.SplitHostPort(first); err == nil {
		host = h
	}
	return strings.Contains(host, ".") || host == "localhost" || strings.HasPrefix(first, "[")
}

// bind ties a plain login to the one registry the references name.
func (l *preheatLogin) bind(registries []string) error {
	if l.registry != "" {
		if !slices.Contains(registries, l.registry) {
			return fmt.Errorf("--user is for registry %s, which no reference names", l.registry)
		}
		return nil
	}
	if len(registries) != 1 {
		return fmt.Errorf("--user %s would go to several registries (%s): name the one it is for, --user REGISTRY/%s",
			l.user, strings.Join(registries, ", "), l.user)
	}
	l.registry = registries[0]
	return nil
}

// readPassword fills in the password: from stdin with --password-stdin, else from a
// prompt on the terminal, never echoed.
func (l *preheatLogin) readPassword(fromStdin bool, stdin *os.File, stderr io.Writer) error {
	switch {
	case fromStdin && l.hasPassword:
		return errors.New("--password-stdin and a password in --user: give one")
	case fromStdin:
		line, err := bufio.NewReader(io.LimitReader(stdin, 64<<10)).ReadString('\n')
		if err != nil && err != io.EOF {
			return fmt.Errorf("--password-stdin: %v", err)
		}
		l.password = strings.TrimRight(line, "\r\n")
	case l.hasPassword:
		return nil
	case stdin != nil && term.IsTerminal(int(stdin.Fd())):
		fmt.Fprintf(stderr, "Password for %s at %s: ", l.user, l.registry)
		b, err := term.ReadPassword(int(stdin.Fd()))
		fmt.Fprintln(stderr)
		if err != nil {
			return fmt.Errorf("reading the password: %v", err)
		}
		l.password = string(b)
	default:
		return errors.New("--user without a password and no terminal to ask on: use --password-stdin")
	}
	l.hasPassword = true
	return nil
}

// preheatAuth returns the login for each origin registry: --user for its registry,
// else the docker config's credentials for that registry (docker login REGISTRY; the
// file in DOCKER_CONFIG or ~/.docker/config.json, credential helpers included), else a
// login to the cache itself that is bound to that registry (user REGISTRY/USER), else
// anonymous. What reaches the cache's token broker is always REGISTRY/USER, so no
// credential can be taken for another registry's.
func preheatAuth(login *preheatLogin, keychain authn.Keychain, cacheHost string) func(registry string) authn.Authenticator {
	return func(registry string) authn.Authenticator {
		if login != nil && login.registry == registry {
			return &authn.Basic{Username: registry + "/" + login.user, Password: login.password}
		}
		if cfg, ok := lookup(keychain, registry); ok && (cfg.Username != "" || cfg.Password != "") {
			return &authn.Basic{Username: registry + "/" + cfg.Username, Password: cfg.Password}
		}
		if cfg, ok := lookup(keychain, cacheHost); ok && strings.HasPrefix(cfg.Username, registry+"/") {
			return &authn.Basic{Username: cfg.Username, Password: cfg.Password}
		}
		return authn.Anonymous
	}
}

func lookup(keychain authn.Keychain, host string) (*authn.AuthConfig, bool) {
	reg, err := name.NewRegistry(host)
	if err != nil {
		return nil, false
	}
	a, err := keychain.Resolve(reg)
	if err != nil || a == authn.Anonymous {
		return nil, false
	}
	cfg, err := a.Authorization()
	if err != nil {
		return nil, false
	}
	return cfg, true
}
