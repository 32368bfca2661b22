package httpx

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestOriginRequestHeaders(t *testing.T) {
	client := http.Header{}
	client.Set("Authorization", "Bearer secret")
	client.Add("Accept", "application/vnd.oci.image.index.v1+json")
	client.Add("Accept", "application/vnd.oci.image.manifest.v1+json")
	client.Set("Accept-Encoding", "zstd;q=1.0, gzip;q=0.8, deflate;q=0.5")
	client.Set("Cookie", "session=1")
	client.Set("X-Forwarded-For", "10.0.0.1")
	client.Set("Range", "bytes=0-")
	h := OriginRequestHeaders(client)
	if h.Get("Authorization") != "Bearer secret" {
		t.Fatal("credentials not forwarded")
	}
	if len(h.Values("Accept")) != 2 {
		t.Fatal("Accept not forwarded whole")
	}
	if h.Get("Accept-Encoding") != "identity" {
		t.Fatalf("Accept-Encoding = %q, want identity", h.Get("Accept-Encoding"))
	}
	for _, k := range []string{"Cookie", "X-Forwarded-For", "Range"} {
		if h.Get(k) != "" {
			t.Fatalf("%s forwarded", k)
		}
	}
}

func TestCopyRelayed(t *testing.T) {
	src := http.Header{}
	src.Set("Www-Authenticate", `Bearer realm="https://auth.example/token",service="r",scope="repository:a:pull"`)
	src.Set("Content-Type", "application/json")
	src.Set("Set-Cookie", "x=1")
	src.Set("Connection", "close")
	src.Set("Location", "https://s3.internal/bucket/blob")
	dst := http.Header{}
	CopyRelayed(dst, src)
	if dst.Get("Www-Authenticate") != src.Get("Www-Authenticate") || dst.Get("Content-Type") != "application/json" {
		t.Fatal("allow-listed header lost")
	}
	for _, k := range []string{"Set-Cookie", "Connection", "Location"} {
		if dst.Get(k) != "" {
			t.Fatalf("%s relayed", k)
		}
	}
}

func TestWriteError(t *testing.T) {
	rec := httptest.NewRecorder()
	rec.Header().Set("Content-Length", "99")
	WriteError(rec, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown")
	if rec.Code != 404 || !strings.Contains(rec.Body.String(), `{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}`) {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if rec.Header().Get("Content-Length") != "" {
		t.Fatal("stale Content-Length kept")
	}
}
