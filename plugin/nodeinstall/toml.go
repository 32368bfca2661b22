// Package nodeinstall installs cove-node beside containerd on a node, removes it again, and
// checks that containerd really pulls through it (doctor). It edits containerd's
// config.toml and hosts.toml with go-toml/v2, the library containerd itself parses them
// with: its parser locates what to change, so every edit is minimal and everything else in
// the file stays byte for byte; its decoder checks every file before and after the edit.
package nodeinstall

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// expr is one top-level expression of a TOML document, located in its bytes. The parser's
// nodes are valid only until its next expression, so expr copies what it needs.
type expr struct {
	kind  unstable.Kind // unstable.Table, unstable.ArrayTable or unstable.KeyValue
	table []string      // KeyValue: the table it is in (nil: the root table)
	key   []string      // Table, ArrayTable: the table's name; KeyValue: its dotted key
	start int           // offset of its first byte (the '[' of a header, a key's first byte)
	end   int           // offset just after it (after the header's ']', after the value)
	value value         // KeyValue only
}

// value is a KeyValue's value: strings and arrays of strings are all the install reads.
type value struct {
	kind  unstable.Kind
	str   string // String: its decoded content
	elems []elem // Array: its elements
}

// elem is one element of an array, with its position (strings only; other kinds have none).
type elem struct {
	kind       unstable.Kind
	str        string
	start, end int
}

// path is the full dotted key of a KeyValue: its table's name, then its own key.
func (e expr) path() []string { return append(append([]string(nil), e.table...), e.key...) }

// parseDoc parses b into its top-level expressions, and checks it as containerd's decoder
// will (duplicate keys, tables defined twice: what the parser alone accepts).
func parseDoc(b []byte) ([]expr, error) {
	if err := checkTOML(b); err != nil {
		return nil, err
	}
	var p unstable.Parser
	p.Reset(b)
	var out []expr
	var table []string
	for p.NextExpression() {
		n := p.Expression()
		switch n.Kind {
		case unstable.Table, unstable.ArrayTable:
			k, first := keyOf(n.Key())
			start := int(first.Raw.Offset)
			for start > 0 && b[start-1] != '[' {
				start--
			}
			for start > 0 && b[start-1] == '[' {
				start--
			}
			end := int(first.Raw.Offset)
			for end < len(b) && b[end] != '\n' {
				end++
			}
			table = k
			out = append(out, expr{kind: n.Kind, key: k, start: start, end: end})
		case unstable.KeyValue:
			k, first := keyOf(n.Key())
			e := expr{kind: n.Kind, table: table, key: k, start: int(first.Raw.Offset), end: int(n.Raw.Offset + n.Raw.Length)}
			v := n.Value()
			e.value.kind = v.Kind
			switch v.Kind {
			case unstable.String:
				e.value.str = string(v.Data)
			case unstable.Array:
				it := v.Children()
				for it.Next() {
					c := it.Node()
					el := elem{kind: c.Kind}
					if c.Kind == unstable.String {
						el.str = string(c.Data)
						el.start, el.end = int(c.Raw.Offset), int(c.Raw.Offset+c.Raw.Length)
					}
					e.value.elems = append(e.value.elems, el)
				}
			}
			out = append(out, e)
		}
	}
	if err := p.Error(); err != nil {
		return nil, tomlError(b, err)
	}
	return out, nil
}

// keyOf returns a key's parts and its first part's node.
func keyOf(it unstable.Iterator) ([]string, *unstable.Node) {
	var parts []string
	var first *unstable.Node
	for it.Next() {
		if first == nil {
			first = it.Node()
		}
		parts = append(parts, string(it.Node().Data))
	}
	return parts, first
}

// checkTOML decodes b as containerd does and returns the first error with its line.
func checkTOML(b []byte) error {
	var m map[string]any
	return tomlError(b, toml.Unmarshal(b, &m))
}

// decode returns the document's tables as maps (go-toml/v2's decoding).
func decode(b []byte) (map[string]any, error) {
	m := map[string]any{}
	if err := toml.Unmarshal(b, &m); err != nil {
		return nil, tomlError(b, err)
	}
	return m, nil
}

// tomlError says where in b err happened: "line N: message".
func tomlError(b []byte, err error) error {
	if err == nil {
		return nil
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, _ := de.Position()
		return fmt.Errorf("line %d: %s", row, de.Error())
	}
	var pe *unstable.ParserError
	if errors.As(err, &pe) && len(pe.Highlight) > 0 {
		if off := offsetIn(b, pe.Highlight); off >= 0 {
			return fmt.Errorf("line %d: %s", bytes.Count(b[:off], []byte("\n"))+1, pe.Message)
		}
	}
	return err
}

// offsetIn is the offset of sub in b when sub is a slice of b, else -1.
func offsetIn(b, sub []byte) int {
	off := cap(b) - cap(sub)
	if off < 0 || off > len(b) {
		return -1
	}
	return off
}

// lookup walks m along keys and returns what is there (nil when absent).
func lookup(m map[string]any, keys ...string) any {
	var cur any = m
	for _, k := range keys {
		t, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = t[k]
	}
	return cur
}

// lookupString is lookup for a string ("" when absent or not a string).
func lookupString(m map[string]any, keys ...string) string {
	s, _ := lookup(m, keys...).(string)
	return s
}

// lineStart is the offset of the start of the line holding offset off.
func lineStart(b []byte, off int) int {
	for off > 0 && b[off-1] != '\n' {
		off--
	}
	return off
}

// lineEnd is the offset just after the newline ending the line holding off (len(b) at the
// end of a last line without one).
func lineEnd(b []byte, off int) int {
	if i := bytes.IndexByte(b[off:], '\n'); i >= 0 {
		return off + i + 1
	}
	return len(b)
}

// splice returns b with b[from:to] replaced by s, in a new slice.
func splice(b []byte, from, to int, s string) []byte {
	out := make([]byte, 0, len(b)+len(s))
	out = append(out, b[:from]...)
	out = append(out, s...)
	return append(out, b[to:]...)
}

// Short names for the node kinds the install reads.
const (
	kindKeyValue   = unstable.KeyValue
	kindTable      = unstable.Table
	kindArrayTable = unstable.ArrayTable
	kindArray      = unstable.Array
	kindString     = unstable.String
)
