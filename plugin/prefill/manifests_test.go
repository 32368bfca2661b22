package prefill_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/plugin/prefill"
)

// Which blobs a served manifest makes cove-node prefill: config and layers of image
// manifests (OCI and Docker), nothing for an index (the platform is containerd's choice)
// and nothing with an invalid digest.
func TestWhatIsPrefilled(t *testing.T) {
	for file, want := range map[string][]string{
		"oci-manifest.json": {
			"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
			"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
			"sha256:486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7",
		},
		"docker-manifest.json": {
			"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
			"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
		},
		"oci-index.json":               nil,
		"invalid-digest-manifest.json": nil,
	} {
		t.Run(file, func(t *testing.T) {
			body, err := os.ReadFile(filepath.Join("..", "..", "testdata", "manifests", file))
			if err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			var fetched []string
			dir := t.TempDir()
			p, err := prefill.New(prefill.Config{
				ContentRoot: filepath.Join(dir, "content"),
				SpoolDir:    filepath.Join(dir, "spool"),
				Fetch: func(_ context.Context, registry, repo string, d digest.Digest, h http.Header) (*http.Response, error) {
					mu.Lock()
					fetched = append(fetched, d.String())
					mu.Unlock()
					if registry != "ghcr.io" || repo != "team/app" || h.Get("Authorization") != "Bearer tenant-token" {
						t.Errorf("prefill fetched with %s %s %q: not the manifest's registry, repository and credentials", registry, repo, h.Get("Authorization"))
					}
					return &http.Response{StatusCode: http.StatusNotFound, Body: http.NoBody, Header: http.Header{}}, nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			hdr := http.Header{"Authorization": {"Bearer tenant-token"}}
			hold := p.OnManifest(context.Background(), mirror.Manifest{
				Registry: "ghcr.io", Repository: "team/app", Digest: digest.FromBytes(body), Body: body, Header: hdr,
			})
			if (hold == nil) != (want == nil) {
				t.Fatalf("hold = %v, want one only when blobs are prefilled", hold != nil)
			}
			if hold != nil {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				hold(ctx)
			}
			mu.Lock()
			defer mu.Unlock()
			sort.Strings(fetched)
			if strings.Join(fetched, ",") != strings.Join(want, ",") {
				t.Fatalf("fetched %v, want %v", fetched, want)
			}
		})
	}
}
