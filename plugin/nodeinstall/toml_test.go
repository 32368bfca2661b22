package nodeinstall

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseDocLocatesExpressions(t *testing.T) {
	doc := "# c\nversion = 3\n[ plugins.\"a.b\" ] # t\n  x.y = 'v'\n[[list]]\n  arr = [\"p\", 'q']\n"
	exprs, err := parseDoc([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	type got struct {
		path, text string
	}
	var gs []got
	for _, e := range exprs {
		p := e.key
		if e.kind == kindKeyValue {
			p = e.path()
		}
		gs = append(gs, got{strings.Join(p, "|"), doc[e.start:e.end]})
	}
	want := []got{
		{"version", "version = 3"},
		{"plugins|a.b", "[ plugins.\"a.b\" ] # t"},
		{"plugins|a.b|x|y", "x.y = 'v'"},
		{"list", "[[list]]"},
		{"list|arr", "arr = [\"p\", 'q']"},
	}
	if !reflect.DeepEqual(gs, want) {
		t.Errorf("expressions:\n%q\nwant\n%q", gs, want)
	}
	arr := exprs[4].value.elems
	if len(arr) != 2 || doc[arr[0].start:arr[0].end] != `"p"` || arr[1].str != "q" {
		t.Errorf("array elements %+v", arr)
	}
}

func TestTOMLErrorsNameTheLine(t *testing.T) {
	for in, want := range map[string]string{
		"version = 3\nroot = \"/a\"\nroot = \"/b\"\n": "line 3:",
		"version = 3\n[plugins\n":                     "line 2:",
		"a = 1\n\n\nb = \"x":                          "line 4:",
	} {
		if _, err := parseDoc([]byte(in)); err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("parseDoc(%q) = %v, want %q...", in, err, want)
		}
	}
}
