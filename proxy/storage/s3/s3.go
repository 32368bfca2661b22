// Package s3 is the storage backend for S3-compatible object storage (AWS S3, MinIO,
// Ceph RGW, ...), with minio-go as the client.
//
// Layout in the bucket:
//
//	blobs/<algorithm>/<encoded>  complete, verified blobs
//	records/<key>                small metadata values
//
// A blob becomes visible only when it is whole and verified: Put uploads it in parts of
// PartSize (one part buffer per upload, whatever the blob's size) and completes the
// multipart upload only after the last part has matched the digest and size; otherwise
// the upload is aborted. A blob no larger than one part is read whole, verified, and
// then sent with a single PUT. Open reads with ranged GETs, one stream at a time, so
// serving a range or a whole large blob keeps memory flat.
//
// Credentials come only from the standard AWS places (environment variables, the shared
// credentials file, then IAM: EC2/ECS/EKS roles), never from cove's own flags; they are
// never logged and never part of an error.
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

const (
	// DefaultRegion is the region signed for when Config.Region is empty.
	DefaultRegion = "us-east-1"
	// DefaultPartSize is the multipart part size, and the largest blob sent with a
	// single PUT: the memory one upload holds.
	DefaultPartSize = 16 << 20
	// DefaultMaxUploads is how many large blobs are uploaded at once.
	DefaultMaxUploads = 4
	// smallBlob: blobs up to this size are read into a buffer of their own size and never
	// wait for an upload slot.
	smallBlob = 1 << 20
	// maxParts is S3's limit on the parts of one multipart upload.
	maxParts = 10000
	// maxRecordSize bounds what GetRecord reads: records are small metadata values.
	maxRecordSize = 1 << 20
	// metaTimeout bounds one small request (a stat, a record): a store that hangs costs a
	// cache hit, not a pull.
	metaTimeout = 10 * time.Second
	// defaultStaleUploadAge: incomplete uploads older than this are aborted at start (a
	// crash or kill -9 mid-upload leaves one behind; uploads of other replicas are younger).
	defaultStaleUploadAge = 24 * time.Hour
)

const (
	blobPrefix   = "blobs/"
	recordPrefix = "records/"
)

// Config says where the store lives.
type Config struct {
	// Endpoint is the S3 endpoint URL: http://127.0.0.1:9000, https://s3.amazonaws.com.
	// It carries no credentials and no path.
	Endpoint string
	// Bucket must exist; New checks it.
	Bucket string
	// Region is the signing region (DefaultRegion when empty).
	Region string
	// PartSize is the multipart part size (DefaultPartSize when 0; at least 5 MiB).
	PartSize int64
	// MaxUploads bounds the blobs larger than 1 MiB being uploaded at once, each holding
	// one part buffer (DefaultMaxUploads when 0): memory for uploads is at most
	// MaxUploads*PartSize. Smaller blobs (manifests, configs) never wait for a slot.
	MaxUploads int
	// StaleUploadAge: New aborts incomplete uploads under blobs/ begun longer ago than
	// this (a day when 0); younger ones may be another replica's, in progress.
	StaleUploadAge time.Duration
	// Transport overrides the HTTP transport (tests; custom CAs).
	Transport http.RoundTripper
	Logger    *slog.Logger
}

// Driver is a storage.Driver over one S3 bucket.
type Driver struct {
	client   *minio.Client // retries failed requests: writes, listings, blob reads
	lookup   *minio.Client // tries once: stats and record reads on the request path
	core     minio.Core
	bucket   string
	endpoint string // scheme://host, for errors and logs
	partSize int64
	uploads  chan struct{} // upload slots for blobs larger than smallBlob
	up       breaker
	log      *slog.Logger
}

var _ storage.Driver = (*Driver)(nil)

// DefaultCredentials is the standard AWS credentials chain: AWS_ACCESS_KEY_ID and
// AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), then the shared credentials file
// (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, profile AWS_PROFILE), then IAM
// (EC2 instance role, ECS task role, EKS web identity).
func DefaultCredentials() *credentials.Credentials {
	return credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{},
		&credentials.IAM{},
	})
}

// ParseEndpoint checks an endpoint URL: http or https, a host, and nothing else (no
// user info: credentials never come from a URL). It returns host[:port] and whether
// the endpoint uses TLS.
func ParseEndpoint(endpoint string) (host string, secure bool, err error) {
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", false, fmt.Errorf("%w: S3 endpoint: want http(s)://HOST[:PORT]", errdefs.ErrInvalidArgument)
	}
	if u.User != nil {
		return "", false, fmt.Errorf("%w: S3 endpoint must not carry credentials: give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a shared credentials file", errdefs.ErrInvalidArgument)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return "", false, fmt.Errorf("%w: S3 endpoint %s://%s: want no path or query (the bucket is set apart)", errdefs.ErrInvalidArgument, u.Scheme, u.Host)
	}
	return u.Host, u.Scheme == "https", nil
}

// New connects to the endpoint and checks that the bucket exists and that the
// credentials may use it. It also aborts multipart uploads under blobs/ that a crash
// left behind (older than a day), in the background.
func New(ctx context.Context, cfg Config) (*Driver, error) {
	host, secure, err := ParseEndpoint(cfg.Endpoint)
	if err != nil {
		return nil, err
	}
	if cfg.Bucket == "" {
		return nil, fmt.Errorf("%w: no S3 bucket", errdefs.ErrInvalidArgument)
	}
	if cfg.Region == "" {
		cfg.Region = DefaultRegion
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = DefaultPartSize
	}
	if cfg.PartSize < 5<<20 {
		return nil, fmt.Errorf("%w: S3 part size %d is below S3's minimum of 5 MiB", errdefs.ErrInvalidArgument, cfg.PartSize)
	}
	if cfg.MaxUploads <= 0 {
		cfg.MaxUploads = DefaultMaxUploads
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	scheme := "http"
	if secure {
		scheme = "https"
	}
	creds := DefaultCredentials()
	newClient := func(retries int) (*minio.Client, error) {
		c, err := minio.New(host, &minio.Options{Creds: creds, Secure: secure, Region: cfg.Region, Transport: cfg.Transport, MaxRetries: retries})
		if err != nil {
			return nil, fmt.Errorf("S3 client for %s://%s: %w", scheme, host, err)
		}
		return c, nil
	}
	// Writes retry a few times to ride out a blip. A lookup that fails is a cache miss,
	// so lookups are not retried: a store that is down costs each pull milliseconds.
	client, err := newClient(3)
	if err != nil {
		return nil, err
	}
	lookup, err := newClient(1)
	if err != nil {
		return nil, err
	}
	d := &Driver{
		client:   client,
		lookup:   lookup,
		core:     minio.Core{Client: client},
		bucket:   cfg.Bucket,
		endpoint: scheme + "://" + host,
		partSize: cfg.PartSize,
		uploads:  make(chan struct{}, cfg.MaxUploads),
		log:      cfg.Logger,
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ok, err := client.BucketExists(cctx, cfg.Bucket)
	if err != nil {
		return nil, d.startErr(err)
	}
	if !ok {
		return nil, fmt.Errorf("%w: S3 bucket %q does not exist at %s: create it first (cove-cache does not create buckets)",
			errdefs.ErrNotFound, cfg.Bucket, d.endpoint)
	}
	if cfg.StaleUploadAge <= 0 {
		cfg.StaleUploadAge = defaultStaleUploadAge
	}
	go d.abortStaleUploads(context.WithoutCancel(ctx), cfg.StaleUploadAge)
	return d, nil
}

// startErr explains why the start-up check failed, without the credentials.
func (d *Driver) startErr(err error) error {
	resp := minio.ToErrorResponse(err)
	switch {
	case resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusUnauthorized ||
		resp.Code == "AccessDenied" || resp.Code == "InvalidAccessKeyId" || resp.Code == "SignatureDoesNotMatch":
		code := resp.Code
		if code == "" {
			code = http.StatusText(resp.StatusCode)
		}
		return fmt.Errorf("%w: S3 at %s refused access to bucket %q (%s): check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE, or the IAM role) and the bucket policy",
			errdefs.ErrPermissionDenied, d.endpoint, d.bucket, code)
	}
	return fmt.Errorf("%w: S3 at %s: checking bucket %q: %v", errdefs.ErrUnavailable, d.endpoint, d.bucket, err)
}

// Endpoint is scheme://host of the store (no credentials), for logs.
func (d *Driver) Endpoint() string { return d.endpoint }

// Bucket is the bucket the store lives in.
func (d *Driver) Bucket() string { return d.bucket }

func blobKey(dgst digest.Digest) (string, error) {
	if err := storage.Verify(dgst); err != nil {
		return "", err
	}
	return blobPrefix + dgst.Algorithm().String() + "/" + dgst.Encoded(), nil
}

func recordKey(key string) (string, error) {
	if err := storage.ValidateKey(key); err != nil {
		return "", err
	}
	return recordPrefix + key, nil
}

// classify maps an S3 error onto errdefs; what names the object for the message.
func classify(err error, what string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	resp := minio.ToErrorResponse(err)
	switch {
	case resp.Code == "NoSuchKey" || resp.StatusCode == http.StatusNotFound && resp.Code != "NoSuchBucket":
		return fmt.Errorf("%w: %s", errdefs.ErrNotFound, what)
	case resp.Code == "NoSuchBucket":
		return fmt.Errorf("%w: S3 bucket %s is gone: %v", errdefs.ErrUnavailable, resp.BucketName, err)
	case resp.StatusCode == http.StatusForbidden:
		return fmt.Errorf("%w: S3 refused access to %s (%s)", errdefs.ErrPermissionDenied, what, resp.Code)
	}
	return fmt.Errorf("S3: %s: %w", what, err)
}

// meta runs one small request under metaTimeout, through the breaker. fn returns
// minio-go's own errors, unclassified.
func (d *Driver) meta(ctx context.Context, fn func(ctx context.Context) error) error {
	if err := d.up.check(); err != nil {
		return err
	}
	mctx, cancel := context.WithTimeout(ctx, metaTimeout)
	defer cancel()
	err := fn(mctx)
	d.up.note(ctx, err)
	return err
}

func (d *Driver) Stat(ctx context.Context, dgst digest.Digest) (int64, error) {
	key, err := blobKey(dgst)
	if err != nil {
		return 0, err
	}
	var info minio.ObjectInfo
	err = d.meta(ctx, func(ctx context.Context) (err error) {
		info, err = d.lookup.StatObject(ctx, d.bucket, key, minio.StatObjectOptions{})
		return err
	})
	if err != nil {
		return 0, classify(err, dgst.String())
	}
	return info.Size, nil
}

func (d *Driver) Open(ctx context.Context, dgst digest.Digest) (storage.Blob, error) {
	size, err := d.Stat(ctx, dgst)
	if err != nil {
		return nil, err
	}
	key, _ := blobKey(dgst)
	return &blob{ctx: ctx, d: d, key: key, name: dgst.String(), size: size}, nil
}

func (d *Driver) Delete(ctx context.Context, dgst digest.Digest) error {
	key, err := blobKey(dgst)
	if err != nil {
		return err
	}
	return d.remove(ctx, key, dgst.String())
}

// remove deletes key, answering ErrNotFound when it is absent (S3's DELETE succeeds
// either way, so it is asked first).
func (d *Driver) remove(ctx context.Context, key, what string) error {
	return classify(d.meta(ctx, func(ctx context.Context) error {
		if _, err := d.client.StatObject(ctx, d.bucket, key, minio.StatObjectOptions{}); err != nil {
			return err
		}
		return d.client.RemoveObject(ctx, d.bucket, key, minio.RemoveObjectOptions{})
	}), what)
}

func (d *Driver) PutRecord(ctx context.Context, key string, value []byte) error {
	k, err := recordKey(key)
	if err != nil {
		return err
	}
	return classify(d.meta(ctx, func(ctx context.Context) error {
		_, err := d.client.PutObject(ctx, d.bucket, k, bytes.NewReader(value), int64(len(value)),
			minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true})
		return err
	}), "record "+key)
}

func (d *Driver) GetRecord(ctx context.Context, key string) ([]byte, error) {
	k, err := recordKey(key)
	if err != nil {
		return nil, err
	}
	var b []byte
	err = d.meta(ctx, func(ctx context.Context) error {
		body, _, _, err := minio.Core{Client: d.lookup}.GetObject(ctx, d.bucket, k, minio.GetObjectOptions{})
		if err != nil {
			return err
		}
		defer body.Close()
		b, err = io.ReadAll(io.LimitReader(body, maxRecordSize+1))
		return err
	})
	if err != nil {
		return nil, classify(err, "record "+key)
	}
	if len(b) > maxRecordSize {
		return nil, fmt.Errorf("%w: record %s is larger than %d bytes", errdefs.ErrFailedPrecondition, key, maxRecordSize)
	}
	return b, nil
}

func (d *Driver) DeleteRecord(ctx context.Context, key string) error {
	k, err := recordKey(key)
	if err != nil {
		return err
	}
	return d.remove(ctx, k, "record "+key)
}

// Walk lists blobs/. Names that are not a valid digest (none are written) are skipped.
func (d *Driver) Walk(ctx context.Context, fn func(storage.BlobInfo) error) error {
	return d.list(ctx, blobPrefix, func(name string, size int64) error {
		alg, enc, ok := strings.Cut(name, "/")
		dgst := digest.NewDigestFromEncoded(digest.Algorithm(alg), enc)
		if !ok || dgst.Validate() != nil {
			return nil
		}
		return fn(storage.BlobInfo{Digest: dgst, Size: size})
	})
}

// ListRecords lists records/<prefix>.
func (d *Driver) ListRecords(ctx context.Context, prefix string, fn func(key string) error) error {
	if err := storage.ValidatePrefix(prefix); err != nil {
		return err
	}
	return d.list(ctx, recordPrefix+prefix, func(name string, _ int64) error {
		return fn(prefix + name)
	})
}

// list calls fn with the name (after prefix) and size of every object under prefix,
// stopping the listing when fn fails.
func (d *Driver) list(ctx context.Context, prefix string, fn func(name string, size int64) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the lister's goroutine when fn stops early
	if err := d.up.check(); err != nil {
		return err
	}
	for obj := range d.client.ListObjects(ctx, d.bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if obj.Err != nil {
			return classify(obj.Err, "listing "+prefix)
		}
		if err := fn(strings.TrimPrefix(obj.Key, prefix), obj.Size); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// abortStaleUploads aborts multipart uploads under blobs/ begun more than age ago: a process killed mid-upload cannot abort its own. Younger ones may belong to
// another cove-cache on the same bucket and are left alone. Best effort.
func (d *Driver) abortStaleUploads(ctx context.Context, age time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	n := 0
	// Listed without a prefix, filtered here: MinIO lists uploads under a whole object
	// name only, and finds none under "blobs/".
	for up := range d.client.ListIncompleteUploads(ctx, d.bucket, "", true) {
		if up.Err != nil {
			d.log.Warn("S3: listing incomplete uploads failed", "endpoint", d.endpoint, "bucket", d.bucket, "error", up.Err)
			return
		}
		if !strings.HasPrefix(up.Key, blobPrefix) || time.Since(up.Initiated) < age {
			continue
		}
		if err := d.core.AbortMultipartUpload(ctx, d.bucket, up.Key, up.UploadID); err != nil {
			d.log.Warn("S3: aborting a stale upload failed", "bucket", d.bucket, "key", up.Key, "error", err)
			continue
		}
		n++
	}
	if n > 0 {
		d.log.Info("S3: aborted stale incomplete uploads", "bucket", d.bucket, "count", n)
	}
}
