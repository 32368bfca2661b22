package nodeinstall

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// ImportNote ends the imports line the install adds to a root config that had none;
// uninstalling after later edits removes exactly that line (node.sh wrote the same).
const ImportNote = "# added by cove install/node.sh"

// AddImport returns the root config cfg (the file containerd reads as cfgPath) with
// dropin in its top-level imports, with a minimal edit: a new `imports = [...]` line after
// `version`, or dropin appended to the existing array; every other byte stays. changed is
// false when an import already loads dropin (a glob such as conf.d/*.toml counts).
func AddImport(cfg []byte, cfgPath, dropin string) (out []byte, changed bool, err error) {
	exprs, err := parseDoc(cfg)
	if err != nil {
		return nil, false, err
	}
	q := strconv.Quote(dropin)
	var imports, version *expr
	for i := range exprs {
		e := &exprs[i]
		if e.kind != kindKeyValue || e.table != nil || len(e.key) != 1 {
			continue
		}
		switch e.key[0] {
		case "imports":
			imports = e
		case "version":
			version = e
		}
	}
	if imports == nil {
		line := "imports = [" + q + "]  " + ImportNote + "\n"
		if version == nil {
			return splice(cfg, 0, 0, line), true, nil
		}
		at := lineEnd(cfg, version.end)
		prefix := ""
		if at == len(cfg) && (at == 0 || cfg[at-1] != '\n') {
			prefix = "\n"
		}
		return splice(cfg, at, at, prefix+line), true, nil
	}
	if imports.value.kind != kindArray {
		return nil, false, fmt.Errorf("imports is not an array")
	}
	for _, el := range imports.value.elems {
		if el.kind != kindString {
			return nil, false, fmt.Errorf("imports holds a value that is not a string")
		}
		if importCovers(resolveImport(cfgPath, el.str), dropin) {
			return cfg, false, nil
		}
	}
	closing := imports.end - 1
	if closing < 0 || cfg[closing] != ']' {
		return nil, false, fmt.Errorf("cannot find the ] closing imports")
	}
	elems := imports.value.elems
	if len(elems) == 0 {
		return splice(cfg, closing, closing, q), true, nil
	}
	last := elems[len(elems)-1]
	trailing := strings.Contains(stripComments(string(cfg[last.end:closing])), ",")
	if lineStart(cfg, closing) <= imports.start || strings.TrimSpace(string(cfg[lineStart(cfg, closing):closing])) != "" {
		// One-line array, or ] right after an element: append before the ].
		ins := ", " + q
		if trailing {
			ins = " " + q + ","
		}
		return splice(cfg, closing, closing, ins), true, nil
	}
	// Multi-line array closed on its own line: a comma after the last element if it has
	// none, then dropin on a line of its own, indented like the last element.
	ls := lineStart(cfg, last.start)
	indent := cfg[ls:ls]
	for i := ls; i < last.start && (cfg[i] == ' ' || cfg[i] == '\t'); i++ {
		indent = cfg[ls : i+1]
	}
	out = splice(cfg, lineStart(cfg, closing), lineStart(cfg, closing), string(indent)+q+",\n")
	if !trailing {
		out = splice(out, last.end, last.end, ",")
	}
	return out, true, nil
}

// RemoveImport returns cfg without the import of dropin the install added (for an
// uninstall after somebody else edited the root config): the line AddImport added, or the
// element in the array with the comma that joined it. changed is false when there is none.
func RemoveImport(cfg []byte, dropin string) (out []byte, changed bool, err error) {
	exprs, err := parseDoc(cfg)
	if err != nil {
		return nil, false, err
	}
	q := strconv.Quote(dropin)
	for _, e := range exprs {
		if e.kind != kindKeyValue || e.table != nil || len(e.key) != 1 || e.key[0] != "imports" || e.value.kind != kindArray {
			continue
		}
		ls, le := lineStart(cfg, e.start), lineEnd(cfg, e.end)
		if strings.TrimRight(string(cfg[ls:le]), "\n") == "imports = ["+q+"]  "+ImportNote {
			return splice(cfg, ls, le, ""), true, nil
		}
		for i, el := range e.value.elems {
			if el.kind != kindString || el.str != dropin {
				continue
			}
			from, to := el.start, el.end
			// The comma after it, or else the one before it.
			rest := cfg[to:]
			j := 0
			for j < len(rest) && (rest[j] == ' ' || rest[j] == '\t') {
				j++
			}
			if j < len(rest) && rest[j] == ',' {
				to += j + 1
				for to < len(cfg) && cfg[to] == ' ' && i == 0 {
					to++
				}
			} else if i > 0 {
				prev := e.value.elems[i-1]
				k := strings.LastIndex(string(cfg[prev.end:from]), ",")
				if k >= 0 && !strings.Contains(string(cfg[prev.end+k:from]), "\n") {
					from = prev.end + k
				}
			}
			// A line that held only this element goes whole.
			els, ele := lineStart(cfg, from), lineEnd(cfg, to)
			if strings.TrimSpace(string(cfg[els:from])) == "" && strings.TrimSpace(string(cfg[to:ele])) == "" && els > ls {
				from, to = els, ele
			}
			out = splice(cfg, from, to, "")
			if err := checkTOML(out); err != nil {
				return nil, false, fmt.Errorf("taking the import out breaks the file (%v)", err)
			}
			return out, true, nil
		}
	}
	return cfg, false, nil
}

// stripComments drops # comments from TOML text that holds no strings (the space
// between array elements).
func stripComments(s string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(s, "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		b.WriteString(line)
	}
	return b.String()
}

// resolveImport is an import as containerd resolves it: relative to its file's directory.
func resolveImport(parent, p string) string {
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(parent), p)
	}
	return filepath.Clean(p)
}

// importCovers says whether the resolved import pattern loads target: containerd globs
// patterns holding a * (filepath.Glob: * and ? do not cross a /) and takes others as they
// are.
func importCovers(pattern, target string) bool {
	if pattern == target {
		return true
	}
	if strings.Contains(pattern, "*") {
		ok, err := filepath.Match(pattern, target)
		return err == nil && ok
	}
	return false
}
