package nodeinstall

import (
	"bytes"
	"fmt"
	"reflect"
	"strings"
)

// The lines around cove-node's part of _default/hosts.toml: the uninstall, and the next
// install, take out exactly what is between them (node.sh wrote the same marks).
const (
	BeginMark = "# BEGIN cove-node: managed by install/node.sh, removed by node.sh --uninstall"
	EndMark   = "# END cove-node"
)

// DialTimeout bounds containerd's connection to cove-node: a black-holed loopback address
// must not cost containerd's 30 s default before it tries the next host.
const DialTimeout = "300ms"

// HostsBlock is cove-node's part of _default/hosts.toml: its mirror at addr, first.
func HostsBlock(addr string) string {
	return BeginMark + "\n" +
		"# cove-node on loopback, tried first for every registry without a directory of its own\n" +
		"# here; when it fails containerd tries the next mirror, then the registry itself.\n" +
		"[host.\"http://" + addr + "\"]\n" +
		"  capabilities = [\"pull\", \"resolve\"]\n" +
		"  dial_timeout = \"" + DialTimeout + "\"\n" +
		EndMark + "\n"
}

// StripBlock returns hosts without cove-node's block (from BeginMark to EndMark). A
// BeginMark without its EndMark is an error: stripping to the end of the file would take
// whatever follows with it.
func StripBlock(hosts []byte) ([]byte, error) {
	var out bytes.Buffer
	skip := false
	for _, line := range bytes.SplitAfter(hosts, []byte("\n")) {
		t := strings.TrimRight(string(line), "\r\n")
		if t == BeginMark {
			skip = true
		}
		if !skip {
			out.Write(line)
		}
		if skip && t == EndMark {
			skip = false
		}
	}
	if skip {
		return nil, fmt.Errorf("has the line %q without its %q: cove-node's block has no end, so what follows cannot be told from it; fix the file by hand", BeginMark, EndMark)
	}
	return out.Bytes(), nil
}

// MergeHosts returns the _default hosts.toml with cove-node's block first, from existing
// (nil: there is no file). Everything else in existing stays, byte for byte, after the
// block: other mirrors, their comments, top-level keys; a previous cove-node block is
// replaced. It refuses a file that does not parse (containerd would ignore every mirror in
// it) and one that lists addr already outside the block. The result is checked: it parses,
// cove-node's host is the first host, and every other entry decodes as before.
func MergeHosts(existing []byte, addr string) (out []byte, warnings []string, err error) {
	block := HostsBlock(addr)
	if existing == nil {
		return []byte(block), nil, nil
	}
	if err := checkTOML(existing); err != nil {
		return nil, nil, fmt.Errorf("not valid TOML (%v). containerd ignores every mirror in a file it cannot parse; fix it first", err)
	}
	base, err := StripBlock(existing)
	if err != nil {
		return nil, nil, err
	}
	exprs, err := parseDoc(base)
	if err != nil {
		return nil, nil, fmt.Errorf("without its cove-node block, not valid TOML (%v); fix it first", err)
	}
	before, err := decode(base)
	if err != nil {
		return nil, nil, err
	}
	cove := "http://" + addr
	if lookup(before, "host", cove) != nil {
		return nil, nil, fmt.Errorf("already lists %s outside the cove-node block; remove that entry or pick another --addr", cove)
	}
	if s, ok := before["server"]; ok {
		warnings = append(warnings, fmt.Sprintf("it sets server = %v: in _default that replaces the origin of every registry", s))
	}
	// Before the first table, and before the comment lines right above it (they describe
	// that mirror; never lines that belong to the expression before), never before a
	// top-level key.
	at, prevEnd := -1, 0
	for _, e := range exprs {
		if e.kind == kindTable || e.kind == kindArrayTable {
			at = lineStart(base, e.start)
			break
		}
		prevEnd = e.end
	}
	if at >= 0 {
		for at > prevEnd {
			ls := lineStart(base, at-1)
			if ls < prevEnd || !strings.HasPrefix(strings.TrimLeft(string(base[ls:at]), " \t"), "#") {
				break
			}
			at = ls
		}
		out = splice(base, at, at, block)
	} else {
		out = append([]byte(nil), base...)
		if len(out) > 0 && out[len(out)-1] != '\n' {
			out = append(out, '\n')
		}
		out = append(out, block...)
	}
	if err := checkMerged(out, before, cove); err != nil {
		return nil, nil, fmt.Errorf("cannot put cove-node first in it: %v", err)
	}
	return out, warnings, nil
}

// checkMerged: merged parses, its first host is cove, and without cove's host it decodes
// exactly as before did.
func checkMerged(merged []byte, before map[string]any, cove string) error {
	exprs, err := parseDoc(merged)
	if err != nil {
		return fmt.Errorf("the result does not parse (%v)", err)
	}
	if first := FirstHost(exprs); first != cove {
		return fmt.Errorf("the first host would be %q, not cove-node's %s (a host defined by a dotted key before every table?)", first, cove)
	}
	after, err := decode(merged)
	if err != nil {
		return err
	}
	hosts, _ := after["host"].(map[string]any)
	delete(hosts, cove)
	if len(hosts) == 0 {
		delete(after, "host")
	}
	if !reflect.DeepEqual(before, after) {
		return fmt.Errorf("the other entries would not stay as they are")
	}
	return nil
}

// FirstHost is the name of the first host a hosts.toml document defines, in document
// order (containerd tries hosts in that order): a [host."NAME"] header, a [host."NAME".x]
// one, or a host."NAME".key dotted key.
func FirstHost(exprs []expr) string {
	for _, e := range exprs {
		p := e.key
		if e.kind == kindKeyValue {
			p = e.path()
		}
		if len(p) >= 2 && p[0] == "host" {
			return p[1]
		}
	}
	return ""
}

// ParseHosts parses a hosts.toml for the doctor: its expressions in order, and its tables.
func ParseHosts(b []byte) (exprs []expr, m map[string]any, err error) {
	if exprs, err = parseDoc(b); err != nil {
		return nil, nil, err
	}
	m, err = decode(b)
	return exprs, m, err
}
