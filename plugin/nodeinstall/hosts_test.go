package nodeinstall

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

const addr = "127.0.0.1:5006"

func TestMergeHosts(t *testing.T) {
	block := HostsBlock(addr)
	for _, tc := range []struct{ name, in, want string }{
		{"no file", "\x00absent", block},
		{"empty file", "", block},
		{"another mirror with its comment", "# The team's mirror.\n[host.\"https://mirror.example.com\"]\n  capabilities = [\"pull\"]\n",
			block + "# The team's mirror.\n[host.\"https://mirror.example.com\"]\n  capabilities = [\"pull\"]\n"},
		{"top-level server and a comment above it stay first", "# origin\nserver = \"https://registry.example.com\"\n\n# mirror\n[host.\"https://m\"]\n",
			"# origin\nserver = \"https://registry.example.com\"\n\n" + block + "# mirror\n[host.\"https://m\"]\n"},
		{"a previous block is replaced", strings.Replace(block, addr, "127.0.0.1:5999", 1) + "[host.\"https://m\"]\n",
			block + "[host.\"https://m\"]\n"},
		{"the same block: unchanged", block + "[host.\"https://m\"]\n", block + "[host.\"https://m\"]\n"},
		{"only top-level keys, no final newline", "server = \"https://r\"", "server = \"https://r\"\n" + block},
		{"a multi-line string whose lines look like comments",
			"note = \"\"\"\n# not a comment\"\"\"\n[host.\"https://m\"]\n",
			"note = \"\"\"\n# not a comment\"\"\"\n" + block + "[host.\"https://m\"]\n"},
		{"sub-tables and arrays of tables", "[host.\"https://m\".header]\n  X = [\"1\"]\n[[other]]\n  a = 1\n",
			block + "[host.\"https://m\".header]\n  X = [\"1\"]\n[[other]]\n  a = 1\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var in []byte
			if tc.in != "\x00absent" {
				in = []byte(tc.in)
			}
			out, _, err := MergeHosts(in, addr)
			if err != nil {
				t.Fatal(err)
			}
			if string(out) != tc.want {
				t.Errorf("MergeHosts:\n%s\nwant:\n%s", out, tc.want)
			}
			exprs, m, err := ParseHosts(out)
			if err != nil {
				t.Fatal(err)
			}
			if FirstHost(exprs) != "http://"+addr {
				t.Errorf("first host %q", FirstHost(exprs))
			}
			if caps := lookup(m, "host", "http://"+addr, "capabilities"); !reflect.DeepEqual(caps, []any{"pull", "resolve"}) {
				t.Errorf("capabilities %v", caps)
			}
			again, _, err := MergeHosts(out, addr)
			if err != nil || !bytes.Equal(again, out) {
				t.Errorf("merging again changed the file (%v):\n%s", err, again)
			}
		})
	}
}

func TestMergeHostsWarnsAboutServer(t *testing.T) {
	_, warnings, err := MergeHosts([]byte("server = \"https://r\"\n"), addr)
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "server") {
		t.Errorf("warnings %q, %v", warnings, err)
	}
}

func TestMergeHostsRefuses(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"not TOML", "[host.\"http://x\"\n", "not valid TOML"},
		{"duplicate key", "[host.\"https://m\"]\n  a = 1\n  a = 2\n", "not valid TOML"},
		{"lists the address outside the block", "[host.\"http://" + addr + "\"]\n", "already lists"},
		{"a host by a dotted key before every table", "host.\"https://m\".capabilities = [\"pull\"]\n", "first host"},
		{"an unterminated block hides the rest", BeginMark + "\n[host.\"https://m\"]\n", "without its"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := MergeHosts([]byte(tc.in), addr)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("MergeHosts = %q, %v; want an error saying %q", out, err, tc.want)
			}
		})
	}
}

// FuzzMergeHosts: whatever the existing file holds, MergeHosts either refuses it with an
// error or returns a file that parses, has cove-node first, keeps every entry of the
// original (less a previous cove-node block) as it decoded, and gives the original back,
// byte for byte, when the block is stripped again.
func FuzzMergeHosts(f *testing.F) {
	for _, s := range []string{
		"",
		"[host.\"https://mirror.example.com\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
		"# c\nserver = \"https://r\"\n[host.\"https://m\"]\n  skip_verify = true\n  [host.\"https://m\".header]\n    X = [\"1\"]\n",
		HostsBlock("127.0.0.1:7") + "[host.\"https://m\"]\n",
		"a = \"\"\"\n# x\n[host.\"y\"]\n\"\"\"\n[t]\n",
		"[host]\n\"https://m\".capabilities = [\"pull\"]\n",
		"x = { a = 1 }\r\n[[host.\"https://m\".list]]\r\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, _, err := MergeHosts([]byte(in), addr)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		exprs, m, err := ParseHosts(out)
		if err != nil {
			t.Fatalf("merged file does not parse: %v\n%q", err, out)
		}
		if FirstHost(exprs) != "http://"+addr {
			t.Fatalf("first host %q in %q", FirstHost(exprs), out)
		}
		base, err := StripBlock([]byte(in))
		if err != nil {
			t.Fatalf("MergeHosts accepted a file whose block has no end: %q", in)
		}
		orig, err := decode(base)
		if err != nil {
			t.Fatalf("MergeHosts accepted a file that does not parse: %q", in)
		}
		hosts, _ := m["host"].(map[string]any)
		delete(hosts, "http://"+addr)
		if len(hosts) == 0 {
			delete(m, "host")
		}
		if !reflect.DeepEqual(orig, m) {
			t.Fatalf("entries changed:\n%v\nwas\n%v", m, orig)
		}
		stripped, err := StripBlock(out)
		if err != nil {
			t.Fatal(err)
		}
		if len(base) > 0 && base[len(base)-1] != '\n' {
			stripped = bytes.TrimSuffix(stripped, []byte("\n"))
		}
		if !bytes.Equal(stripped, base) {
			t.Fatalf("stripping the block again gives %q, not %q", stripped, base)
		}
	})
}
