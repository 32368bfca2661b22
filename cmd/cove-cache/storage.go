package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/cove-oci/cove/proxy/storage"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
	"github.com/cove-oci/cove/proxy/storage/s3"
)

// s3Options are the S3 storage flags. Credentials are not among them: they come from
// the standard AWS environment variables, shared files or IAM role only.
type s3Options struct {
	endpoint, bucket, region string
}

func (o *s3Options) register(fs *flag.FlagSet) {
	fs.StringVar(&o.endpoint, "s3-endpoint", "", "store blobs and records in S3-compatible storage at this `URL` (http(s)://HOST[:PORT]); --storage-dir then holds only in-flight fills. Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the shared credentials file (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE) or the IAM role")
	fs.StringVar(&o.bucket, "s3-bucket", "", "with --s3-endpoint: the bucket `NAME` (must exist)")
	fs.StringVar(&o.region, "s3-region", s3.DefaultRegion, "with --s3-endpoint: the signing `REGION`")
}

func (o *s3Options) validate() error {
	if o.endpoint == "" {
		if o.bucket != "" {
			return errors.New("--s3-bucket needs --s3-endpoint")
		}
		return nil
	}
	if _, _, err := s3.ParseEndpoint(o.endpoint); err != nil {
		return fmt.Errorf("--s3-endpoint: %v", err)
	}
	if o.bucket == "" {
		return errors.New("--s3-endpoint needs --s3-bucket")
	}
	if o.region == "" {
		return errors.New("--s3-region must not be empty")
	}
	return nil
}

// openedStorage is the store and the local directory its fills are spooled in.
type openedStorage struct {
	store    storage.Driver
	spoolDir string
	attrs    []any // what the start-up log line says about the store
	closer   io.Closer
}

// openStorage opens the filesystem store under --storage-dir, or with --s3-endpoint the
// S3 store with --storage-dir as the locked scratch directory for the spool. It logs
// why it failed.
func openStorage(ctx context.Context, o *options, log *slog.Logger) (*openedStorage, bool) {
	lockErr := func(err error) bool {
		var locked *filesystem.LockedError
		if errors.As(err, &locked) {
			// Another cove-cache on this directory: starting would discard its fills in flight.
			log.Error("storage directory in use by another process: give each cove-cache its own --storage-dir",
				"dir", locked.Dir, "pid", locked.PID, "error", err)
			return true
		}
		return false
	}
	if o.s3.endpoint == "" {
		store, err := filesystem.New(o.storageDir)
		if lockErr(err) {
			return nil, false
		}
		if err != nil {
			log.Error("opening storage failed", "dir", o.storageDir, "error", err)
			return nil, false
		}
		return &openedStorage{store: store, spoolDir: filepath.Join(store.Root(), "spool"), closer: store,
			attrs: []any{"storage", "filesystem", "storage_dir", store.Root()}}, true
	}
	lock, err := filesystem.LockDir(o.storageDir)
	if lockErr(err) {
		return nil, false
	}
	if err != nil {
		log.Error("opening the scratch directory failed", "dir", o.storageDir, "error", err)
		return nil, false
	}
	store, err := s3.New(ctx, s3.Config{Endpoint: o.s3.endpoint, Bucket: o.s3.bucket, Region: o.s3.region, Logger: log})
	if err != nil {
		lock.Close()
		log.Error("opening S3 storage failed", "error", err)
		return nil, false
	}
	dir, _ := filepath.Abs(o.storageDir)
	return &openedStorage{store: store, spoolDir: filepath.Join(dir, "spool"), closer: lock,
		attrs: []any{"storage", "s3", "s3_endpoint", store.Endpoint(), "s3_bucket", store.Bucket(), "storage_dir", dir}}, true
}
