package cluster

import (
	"context"
	"slices"
	"testing"
)

func TestStaticMembership(t *testing.T) {
	s, err := NewStatic([]string{"http://B.example:5005/", "http://a.example:5005", "http://b.example:5005"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"http://a.example:5005", "http://b.example:5005"}; !slices.Equal(s.Members(), want) {
		t.Fatalf("Members() = %v, want %v", s.Members(), want)
	}
	select {
	case <-s.Changed():
		t.Fatal("a static membership changed")
	default:
	}
	if err := s.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	var _ Membership = s
}

func TestStaticMembershipRefusesBadURLs(t *testing.T) {
	for _, u := range []string{"", "a.example:5005", "ftp://a:1", "http://a.example", "http://u:p@a:1", "http://a:1/path", "http://a:1?x=1", "http://a:1#f"} {
		if _, err := NewStatic([]string{"http://ok:1", u}); err == nil {
			t.Errorf("NewStatic accepted %q", u)
		}
	}
	if _, err := NewStatic(nil); err == nil {
		t.Error("NewStatic accepted no members")
	}
}
