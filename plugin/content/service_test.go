package content

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// A panic in a handler becomes an Internal error; the server keeps serving.
func TestPanicBecomesInternal(t *testing.T) {
	t.Parallel()
	log := testLogger(t)
	_, err := recoverUnary(log)(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/test/Unary"},
		func(context.Context, any) (any, error) { panic("boom") })
	if status.Code(err) != codes.Internal {
		t.Fatalf("unary panic gave %v", err)
	}
	err = recoverStream(log)(nil, nil, &grpc.StreamServerInfo{FullMethod: "/test/Stream"},
		func(any, grpc.ServerStream) error { panic("boom") })
	if status.Code(err) != codes.Internal {
		t.Fatalf("stream panic gave %v", err)
	}

	// Through the real server: a malformed request is refused, and both APIs answer.
	sock := filepath.Join(shortDir(t), "c.sock")
	svc := startHook(t, filepath.Join(t.TempDir(), "root"), sock)
	conn, err := grpc.NewClient("unix://"+svc.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := diffapi.NewDiffClient(conn).Apply(ctx, &diffapi.ApplyRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty Apply: %v", err)
	}
	_, err = contentapi.NewContentClient(conn).Info(ctx, &contentapi.InfoRequest{
		Digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("Info of a missing blob: %v", err)
	}
}
