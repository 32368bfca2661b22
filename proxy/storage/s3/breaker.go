package s3

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/minio/minio-go/v7"
)

// downFor is how long the driver answers at once with ErrUnavailable after a request
// got no answer from S3 at all (refused, reset, timed out): while the store is down, a
// pull then loses its cache hits, not seconds per request to retries.
const downFor = 2 * time.Second

// breaker remembers that the endpoint did not answer.
type breaker struct {
	downUntil atomic.Int64 // unix nanoseconds
	lastErr   atomic.Value // string: why, for the fast errors
}

// check fails at once while the endpoint is considered down.
func (b *breaker) check() error {
	if until := b.downUntil.Load(); until != 0 && time.Now().UnixNano() < until {
		why, _ := b.lastErr.Load().(string)
		return fmt.Errorf("%w: S3 did not answer within the last %v: %s", errdefs.ErrUnavailable, downFor, why)
	}
	return nil
}

// note records err's verdict on the endpoint: no answer at all opens the breaker; any
// answer from S3 (an error response included) closes it. The caller's own cancellation
// says nothing about S3.
func (b *breaker) note(ctx context.Context, err error) {
	if err == nil {
		b.downUntil.Store(0)
		return
	}
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return
	}
	if resp := minio.ToErrorResponse(err); resp.StatusCode != 0 || resp.Code != "" {
		b.downUntil.Store(0) // S3 answered
		return
	}
	b.lastErr.Store(err.Error())
	b.downUntil.Store(time.Now().Add(downFor).UnixNano())
}
