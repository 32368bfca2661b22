package nodeinstall

import (
	"reflect"
	"strings"
	"testing"
)

const dropin = "/etc/containerd/conf.d/cove-node.toml"

// importsOf is the decoded imports list of a config.
func importsOf(t *testing.T, b []byte) []any {
	t.Helper()
	m, err := decode(b)
	if err != nil {
		t.Fatalf("result does not parse: %v\n%s", err, b)
	}
	l, _ := m["imports"].([]any)
	return l
}

func TestAddImport(t *testing.T) {
	q := `"` + dropin + `"`
	for _, tc := range []struct{ name, in, want string }{
		{"no imports: after version", "version = 3\nroot = \"/r\"\n",
			"version = 3\nimports = [" + q + "]  " + ImportNote + "\nroot = \"/r\"\n"},
		{"version line with a comment, no final newline", "version = 2 # old layout",
			"version = 2 # old layout\nimports = [" + q + "]  " + ImportNote + "\n"},
		{"version after a comment block", "# header\n\n# more\nversion = 3\n[plugins.\"x\"]\n  a = 1\n",
			"# header\n\n# more\nversion = 3\nimports = [" + q + "]  " + ImportNote + "\n[plugins.\"x\"]\n  a = 1\n"},
		{"empty array", "version = 3\nimports = []\n", "version = 3\nimports = [" + q + "]\n"},
		{"one line", "version = 3\nimports = [\"a.toml\"] # one\n", "version = 3\nimports = [\"a.toml\", " + q + "] # one\n"},
		{"one line, trailing comma", "version = 3\nimports = [\"a.toml\",]\n", "version = 3\nimports = [\"a.toml\", " + q + ",]\n"},
		{"literal strings", "version = 3\nimports = ['a.toml']\n", "version = 3\nimports = ['a.toml', " + q + "]\n"},
		{"multi-line, comments with commas and brackets",
			"version = 3\nimports = [\n  \"a.toml\", # a, b ]\n  \"b.toml\" # no comma, here ]\n]\n",
			"version = 3\nimports = [\n  \"a.toml\", # a, b ]\n  \"b.toml\", # no comma, here ]\n  " + q + ",\n]\n"},
		{"multi-line, trailing comma, tabs", "version = 3\nimports = [\n\t\"a.toml\",\n]\n",
			"version = 3\nimports = [\n\t\"a.toml\",\n\t" + q + ",\n]\n"},
		{"] after the last element", "version = 3\nimports = [\n  \"a.toml\"]\n", "version = 3\nimports = [\n  \"a.toml\", " + q + "]\n"},
		{"glob covers it", "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n", ""},
		{"relative path covers it", "version = 3\nimports = [\"conf.d/cove-node.toml\"]\n", ""},
		{"relative glob covers it", "version = 3\nimports = [\"./conf.d/*\"]\n", ""},
		{"glob that does not cross /", "version = 3\nimports = [\"/etc/*.toml\"]\n",
			"version = 3\nimports = [\"/etc/*.toml\", " + q + "]\n"},
		{"CRLF", "version = 3\r\nroot = \"/r\"\r\n", "version = 3\r\nimports = [" + q + "]  " + ImportNote + "\nroot = \"/r\"\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, changed, err := AddImport([]byte(tc.in), "/etc/containerd/config.toml", dropin)
			if err != nil {
				t.Fatal(err)
			}
			if tc.want == "" {
				if changed || string(out) != tc.in {
					t.Errorf("changed a config whose imports already load the drop-in:\n%s", out)
				}
				return
			}
			if !changed || string(out) != tc.want {
				t.Errorf("AddImport:\n%s\nwant:\n%s", out, tc.want)
			}
			before, after := importsOf(t, []byte(tc.in)), importsOf(t, out)
			if !reflect.DeepEqual(append(before, dropin), after) {
				t.Errorf("imports %q, want %q and the drop-in", after, before)
			}
			// Everything but imports decodes as before.
			mb, _ := decode([]byte(tc.in))
			ma, _ := decode(out)
			delete(mb, "imports")
			delete(ma, "imports")
			if !reflect.DeepEqual(mb, ma) {
				t.Errorf("other settings changed: %v, was %v", ma, mb)
			}
			again, changed, err := AddImport(out, "/etc/containerd/config.toml", dropin)
			if err != nil || changed || string(again) != string(out) {
				t.Errorf("a second AddImport changed the file (%v):\n%s", err, again)
			}
		})
	}
}

func TestAddImportRefuses(t *testing.T) {
	for _, in := range []string{
		"version = 3\nimports = \"a.toml\"\n",
		"version = 3\nimports = [1]\n",
		"version = 3\nversion = 3\n",
		"version = 3\n[plugins\n",
	} {
		if out, _, err := AddImport([]byte(in), "/etc/containerd/config.toml", dropin); err == nil {
			t.Errorf("AddImport(%q) = %q, want an error", in, out)
		}
	}
}

// RemoveImport takes out what AddImport added: where AddImport added no comma, the file is
// as it was, byte for byte; always, the other imports stay.
func TestRemoveImport(t *testing.T) {
	for _, in := range []string{
		"version = 3\n",
		"version = 3\nimports = []\n",
		"version = 3\nimports = [\"a.toml\"] # one\n",
		"version = 3\nimports = [\n  \"a.toml\",\n]\n",
		"version = 3\nimports = [\n  \"a.toml\",\n  \"b.toml\" # b\n]\noom_score = 1\n",
	} {
		added, _, err := AddImport([]byte(in), "/etc/containerd/config.toml", dropin)
		if err != nil {
			t.Fatal(err)
		}
		out, changed, err := RemoveImport(added, dropin)
		if err != nil || !changed {
			t.Fatalf("RemoveImport(%q): %v, changed %v", added, err, changed)
		}
		if !reflect.DeepEqual(importsOf(t, out), importsOf(t, []byte(in))) {
			t.Errorf("imports after RemoveImport: %q, want %q", importsOf(t, out), importsOf(t, []byte(in)))
		}
		if !strings.Contains(in, "b.toml") && string(out) != in {
			t.Errorf("RemoveImport(AddImport(%q)) = %q", in, out)
		}
	}
	if out, changed, _ := RemoveImport([]byte("version = 3\nimports = [\"a.toml\"]\n"), dropin); changed || string(out) != "version = 3\nimports = [\"a.toml\"]\n" {
		t.Errorf("RemoveImport changed a config without the drop-in: %q", out)
	}
}

// FuzzAddImport: whatever the root config holds, AddImport either refuses it or returns a
// config that parses, whose imports are the original ones plus the drop-in (or the same
// file, when an import already loads it), and whose other settings decode as before.
func FuzzAddImport(f *testing.F) {
	for _, s := range []string{
		"version = 3\n",
		"version = 2 # c\nimports = [\n  \"a.toml\", # x, ]\n  'b.toml'\n]\n[plugins]\n",
		"version = 3\nimports = []\r\n",
		"imports = [\"conf.d/*.toml\",]\nversion = 3",
		"version = 3\nimports = [ \"a\" ,\n\n# c\n ]\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, changed, err := AddImport([]byte(in), "/etc/containerd/config.toml", dropin)
		if err != nil {
			return
		}
		before, err := decode([]byte(in))
		if err != nil {
			t.Fatalf("AddImport accepted what does not parse: %q", in)
		}
		after, err := decode(out)
		if err != nil {
			t.Fatalf("result does not parse (%v): %q", err, out)
		}
		bi, _ := before["imports"].([]any)
		ai, _ := after["imports"].([]any)
		if !changed {
			if string(out) != in {
				t.Fatalf("unchanged, but the bytes differ: %q", out)
			}
			return
		}
		if !reflect.DeepEqual(append(append([]any(nil), bi...), dropin), ai) {
			t.Fatalf("imports %q, want %q and the drop-in; from %q to %q", ai, bi, in, out)
		}
		delete(before, "imports")
		delete(after, "imports")
		if !reflect.DeepEqual(before, after) {
			t.Fatalf("other settings changed: %q to %q", in, out)
		}
	})
}
