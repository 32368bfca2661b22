package peers

import (
	"net/http"
	"os"
	"strings"
	"testing"
)

// Three replicas start on distinct ports, each told of all three and of itself, and
// each serves; the secret never appears in their logs.
func TestStartCoveReplicas(t *testing.T) {
	m := StartMinIO(t)
	m.SetEnv(t)
	cr := StartCoveReplicas(t, 3, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)
	seen := map[string]bool{}
	for _, c := range cr.Replicas {
		if seen[c.Addr] {
			t.Fatalf("two replicas on %s", c.Addr)
		}
		seen[c.Addr] = true
		resp, err := http.Get(c.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s /readyz: %d", c.Addr, resp.StatusCode)
		}
	}
	for _, c := range cr.Replicas {
		c.Stop()
		log, err := os.ReadFile(c.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(log), string(cr.Secret)) {
			t.Fatal("the peer secret appears in a replica's log")
		}
		for _, other := range cr.Replicas {
			if !strings.Contains(string(log), other.URL) {
				t.Errorf("%s's start-up line does not list peer %s", c.Addr, other.URL)
			}
		}
	}
}
