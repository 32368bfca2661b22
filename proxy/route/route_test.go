package route

import (
	"errors"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	const d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	tests := []struct {
		path, query    string
		registry, repo string
		kind           Kind
		tag            string
		digest         string
		viaNS          bool
		restQuery      string
	}{
		{path: "/v2/", kind: KindPing},
		{path: "/v2", kind: KindPing},
		{path: "/v2/", query: "ns=ghcr.io", kind: KindPing, registry: "ghcr.io", viaNS: true},
		{path: "/v2/team/app/manifests/v1", query: "ns=127.0.0.1%3A5000", registry: "127.0.0.1:5000", repo: "team/app", kind: KindManifest, tag: "v1", viaNS: true},
		{path: "/v2/team/app/manifests/" + d, query: "ns=ghcr.io", registry: "ghcr.io", repo: "team/app", kind: KindManifest, digest: d, viaNS: true},
		{path: "/v2/team/app/blobs/" + d, query: "ns=ghcr.io", registry: "ghcr.io", repo: "team/app", kind: KindBlob, digest: d, viaNS: true},
		{path: "/v2/quay.io/org/app/manifests/1.0", registry: "quay.io", repo: "org/app", kind: KindManifest, tag: "1.0"},
		{path: "/v2/localhost/app/blobs/" + d, registry: "localhost", repo: "app", kind: KindBlob, digest: d},
		{path: "/v2/127.0.0.1:5000/team/app/tags/list", query: "n=10&last=a", registry: "127.0.0.1:5000", repo: "team/app", kind: KindTags, restQuery: "last=a&n=10"},
		// Docker Hub: unqualified names, library/, and aliases.
		{path: "/v2/alpine/manifests/latest", registry: "docker.io", repo: "library/alpine", kind: KindManifest, tag: "latest"},
		{path: "/v2/bitnami/redis/manifests/7", registry: "docker.io", repo: "bitnami/redis", kind: KindManifest, tag: "7"},
		{path: "/v2/docker.io/alpine/manifests/3", registry: "docker.io", repo: "library/alpine", kind: KindManifest, tag: "3"},
		{path: "/v2/library/alpine/manifests/3", query: "ns=docker.io", registry: "docker.io", repo: "library/alpine", kind: KindManifest, tag: "3", viaNS: true},
		{path: "/v2/alpine/manifests/3", query: "ns=registry-1.docker.io", registry: "docker.io", repo: "library/alpine", kind: KindManifest, tag: "3", viaNS: true},
		{path: "/v2/team/app/referrers/" + d, query: "ns=ghcr.io&artifactType=x%2Fy", registry: "ghcr.io", repo: "team/app", kind: KindReferrers, digest: d, viaNS: true, restQuery: "artifactType=x%2Fy"},
		// A repository may itself end in a segment named like an API word.
		{path: "/v2/a/blobs/manifests/v1", query: "ns=ghcr.io", registry: "ghcr.io", repo: "a/blobs", kind: KindManifest, tag: "v1", viaNS: true},
		{path: "/v2/GHCR.IO/team/app/manifests/v1", registry: "ghcr.io", repo: "team/app", kind: KindManifest, tag: "v1"},
		// Uploads: the start (no handle) and a session's handle; containerd repeats ns=.
		{path: "/v2/team/app/blobs/uploads/", query: "ns=ghcr.io&mount=" + d + "&from=x%2Fy", registry: "ghcr.io", repo: "team/app", kind: KindUpload, viaNS: true, restQuery: "from=x%2Fy&mount=" + strings.ReplaceAll(d, ":", "%3A")},
		{path: "/v2/registry.test/team/app/blobs/uploads/AbC-12_x", query: "digest=" + d, registry: "registry.test", repo: "team/app", kind: KindUpload, restQuery: "digest=" + strings.ReplaceAll(d, ":", "%3A")},
		{path: "/v2/team/app/blobs/uploads/h1", query: "ns=ghcr.io&ns=ghcr.io", registry: "ghcr.io", repo: "team/app", kind: KindUpload, viaNS: true},
		{path: "/v2/a/blobs/blobs/uploads/h1", query: "ns=ghcr.io", registry: "ghcr.io", repo: "a/blobs", kind: KindUpload, viaNS: true},
	}
	for _, tt := range tests {
		t.Run(tt.path+"?"+tt.query, func(t *testing.T) {
			req, err := Router{}.Parse(tt.path, tt.query)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if req.Registry != tt.registry || req.Repository != tt.repo || req.Kind != tt.kind ||
				req.Tag != tt.tag || string(req.Digest) != tt.digest || req.ViaNamespace != tt.viaNS {
				t.Fatalf("got %+v", req)
			}
			if got := req.Query.Encode(); got != tt.restQuery {
				t.Fatalf("query = %q, want %q", got, tt.restQuery)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	const d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	tests := []struct {
		path, query, code string
	}{
		{"/v2/Team/app/manifests/v1", "ns=ghcr.io", "NAME_INVALID"},
		{"/v2/team/../etc/manifests/v1", "ns=ghcr.io", "NAME_INVALID"},
		{"/v2/team//app/manifests/v1", "ns=ghcr.io", "NAME_INVALID"},
		{"/v2/team/app%2F..%2Fx/manifests/v1", "ns=ghcr.io", "NAME_INVALID"},
		{"/v2/team/app/manifests/v1", "ns=ghcr.io%2Fevil", "NAME_INVALID"},
		{"/v2/team/app/manifests/v1", "ns=", ""}, // empty ns = no ns: default registry
		{"/v2/team/app/manifests/v1", "ns=a&ns=b", "UNSUPPORTED"},
		{"/v2/team/app/manifests/v1", "ns=user@host", "NAME_INVALID"},
		{"/v2/team/app/manifests/v1", "ns=%zz", "UNSUPPORTED"},
		{"/v2/team/app/manifests/-v1", "ns=ghcr.io", "MANIFEST_UNKNOWN"},
		{"/v2/team/app/manifests/" + strings.Repeat("a", 129), "ns=ghcr.io", "MANIFEST_UNKNOWN"},
		{"/v2/team/app/manifests/sha256:abc", "ns=ghcr.io", "DIGEST_INVALID"},
		{"/v2/team/app/blobs/v1", "ns=ghcr.io", "DIGEST_INVALID"},
		{"/v2/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", "ns=ghcr.io", "DIGEST_INVALID"},
		{"/v2/team/app/blobs/" + strings.ToUpper(d), "ns=ghcr.io", "DIGEST_INVALID"},
		{"/v2/team/app/blobs/uploads/a.b", "ns=ghcr.io", "BLOB_UPLOAD_UNKNOWN"},
		{"/v2/team/app/blobs/uploads/" + strings.Repeat("a", 65), "ns=ghcr.io", "BLOB_UPLOAD_UNKNOWN"},
		{"/v2/team/app/blobs/uploads/h/x", "ns=ghcr.io", "UNSUPPORTED"},
		{"/v2/team/app/blobs/uploads", "ns=ghcr.io", "DIGEST_INVALID"},
		{"/v2/team/app", "", "UNSUPPORTED"},
		{"/v1/team/app/manifests/v1", "", "UNSUPPORTED"},
		{"/v2/" + strings.Repeat("a/", 600) + "manifests/v1", "", "NAME_INVALID"},
		{"/v2/" + strings.Repeat("a", 256) + "/manifests/v1", "ns=ghcr.io", "NAME_INVALID"},
		{"/v2/team/app/manifests/v1", strings.Repeat("x=1&", 600), "UNSUPPORTED"},
		{"/v2/blobs/" + d, "ns=ghcr.io", "UNSUPPORTED"},
	}
	for _, tt := range tests {
		t.Run(tt.path+"?"+tt.query, func(t *testing.T) {
			_, err := Router{}.Parse(tt.path, tt.query)
			if tt.code == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				return
			}
			var rerr *Error
			if !errors.As(err, &rerr) || rerr.Code != tt.code {
				t.Fatalf("Parse error = %v, want code %s", err, tt.code)
			}
		})
	}
}

func TestDefaultRegistry(t *testing.T) {
	req, err := Router{DefaultRegistry: "mirror.example.com"}.Parse("/v2/team/app/manifests/v1", "")
	if err != nil || req.Registry != "mirror.example.com" || req.Repository != "team/app" {
		t.Fatalf("got %+v, %v", req, err)
	}
}

func TestNormalizeHost(t *testing.T) {
	for in, want := range map[string]string{
		"docker.io": "docker.io", "index.docker.io": "docker.io", "registry-1.docker.io": "docker.io",
		"GHCR.io": "ghcr.io", "127.0.0.1:5000": "127.0.0.1:5000", "[::1]:5000": "[::1]:5000", "localhost": "localhost",
	} {
		if got, err := NormalizeHost(in); err != nil || got != want {
			t.Errorf("NormalizeHost(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "a/b", "host:port", "a b", "-a.com", "a.com:", "a.com:99999999", "user@a.com", "a.com?x", "a.com#x"} {
		if got, err := NormalizeHost(bad); err == nil {
			t.Errorf("NormalizeHost(%q) = %q, want error", bad, got)
		}
	}
	if APIHost("docker.io") != "registry-1.docker.io" || APIHost("ghcr.io") != "ghcr.io" {
		t.Fatal("APIHost")
	}
}

// FuzzParse: whatever the input, Parse either refuses it or returns a request whose every
// part is valid by the grammar, so nothing malformed reaches the origin or storage.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"/v2/team/app/manifests/v1", "/v2/quay.io/a/b/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
		"/v2/", "/v2/a/tags/list", "/v2/../../x/manifests/y", "/v2/a/referrers/sha256:00",
	} {
		f.Add(s, "ns=ghcr.io")
		f.Add(s, "")
	}
	f.Fuzz(func(t *testing.T, path, query string) {
		req, err := Router{}.Parse(path, query)
		if err != nil {
			var rerr *Error
			if !errors.As(err, &rerr) {
				t.Fatalf("error is not a route.Error: %v", err)
			}
			return
		}
		if req.Kind == KindPing {
			return
		}
		if err := ValidateRepository(req.Repository); err != nil {
			t.Fatalf("accepted invalid repository %q", req.Repository)
		}
		if _, err := NormalizeHost(req.Registry); err != nil {
			t.Fatalf("accepted invalid registry %q", req.Registry)
		}
		if req.Digest != "" && req.Digest.Validate() != nil {
			t.Fatalf("accepted invalid digest %q", req.Digest)
		}
		if strings.Contains(req.Repository, "..") || strings.Contains(req.Repository, "//") {
			t.Fatalf("path traversal in repository %q", req.Repository)
		}
	})
}
