package cli

import (
	"bytes"
	"flag"
	"strings"
	"testing"
)

func TestRepeated(t *testing.T) {
	var r Repeated
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.Var(&r, "cache", "")
	if err := fs.Parse([]string{"--cache", "a", "--cache", "b"}); err != nil || r.String() != "a,b" {
		t.Fatalf("%v %v", r, err)
	}
}

func TestNewLogger(t *testing.T) {
	var buf bytes.Buffer
	l, err := NewLogger("debug", "json", &buf)
	if err != nil {
		t.Fatal(err)
	}
	l.Debug("hello", "k", "v")
	if !strings.Contains(buf.String(), `"msg":"hello"`) {
		t.Fatalf("%q", buf.String())
	}
	if _, err := NewLogger("loud", "json", &buf); err == nil || !strings.Contains(err.Error(), "--log-level") {
		t.Fatal(err)
	}
	if _, err := NewLogger("info", "xml", &buf); err == nil || !strings.Contains(err.Error(), "--log-format") {
		t.Fatal(err)
	}
}
