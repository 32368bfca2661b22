package peers

import (
	"context"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
)

// CRIAuth is the CRI API's AuthConfig (k8s.io/cri-api runtime v1) as the kubelet sends
// it with a PullImage request. ServerAddress is the field crictl cannot set:
// containerd's CRI hands the credentials only to a registry host that it names, or to
// every host when it is empty (ParseAuth in internal/cri/server/images/image_pull.go).
type CRIAuth struct {
	Username, Password, ServerAddress string
}

// CRIPull pulls ref through containerd's CRI image service with a PullImage call on its
// gRPC socket, as the kubelet makes it, and returns the image reference CRI answers.
//
// The request is encoded by hand with protowire (runtime.v1.PullImageRequest: image =
// 1 {image = 1}, auth = 2 {username = 1, password = 2, server_address = 4}), so tests
// need no k8s.io/cri-api dependency for one call.
func (c *Containerd) CRIPull(ctx context.Context, ref string, auth *CRIAuth) (string, error) {
	conn, err := grpc.NewClient("unix://"+c.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	var req []byte
	req = protowire.AppendTag(req, 1, protowire.BytesType)
	req = protowire.AppendBytes(req, protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), ref))
	if auth != nil {
		var a []byte
		for _, f := range []struct {
			num protowire.Number
			v   string
		}{{1, auth.Username}, {2, auth.Password}, {4, auth.ServerAddress}} {
			if f.v != "" {
				a = protowire.AppendString(protowire.AppendTag(a, f.num, protowire.BytesType), f.v)
			}
		}
		req = protowire.AppendBytes(protowire.AppendTag(req, 2, protowire.BytesType), a)
	}
	for {
		var resp []byte
		err := conn.Invoke(ctx, "/runtime.v1.ImageService/PullImage", &req, &resp, grpc.ForceCodec(rawCodec{}))
		if err == nil {
			return imageRefOf(resp)
		}
		// The CRI plugin answers Unavailable until its background start-up finished.
		if strings.Contains(err.Error(), "not initialized yet") && ctx.Err() == nil {
			select {
			case <-time.After(50 * time.Millisecond):
				continue
			case <-ctx.Done():
			}
		}
		return "", c.failure("CRI PullImage "+ref, nil, err)
	}
}

// imageRefOf reads PullImageResponse.image_ref (field 1).
func imageRefOf(b []byte) (string, error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeString(b)
			if n < 0 {
				return "", protowire.ParseError(n)
			}
			return v, nil
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return "", protowire.ParseError(n)
		}
		b = b[n:]
	}
	return "", fmt.Errorf("PullImageResponse without image_ref")
}

// rawCodec sends and receives messages already encoded (*[]byte).
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }
