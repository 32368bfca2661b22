package peers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// WithTokenAuth makes the registry use token authentication (distribution's `auth:
// token`) trusting ts: its challenge is `Bearer realm=ts.Realm,service=ts.Service,
// scope=...`, and it accepts only JWTs issued by ts. Push with
// WithPushAuth(TokenAdmin, password): go-containerregistry does the token flow.
func WithTokenAuth(ts *TokenService) RegistryOption {
	return func(c *registryConfig) {
		q := strconv.Quote
		c.auth = fmt.Sprintf("auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
			q(ts.Realm), q(ts.Service), q(ts.Issuer), q(ts.CertBundle))
	}
}

// CrictlPullWith is CrictlPull with extra arguments to `crictl pull` before the
// reference, for example "--creds", "USER:PASSWORD".
func (c *Containerd) CrictlPullWith(ctx context.Context, ref string, extraArgs ...string) error {
	bin := filepath.Join(ToolsDir(), "crictl")
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("crictl not found at %s: run `make tools`", bin)
	}
	ep := "unix://" + c.Address
	args := []string{
		"--config", filepath.Join(c.dir, "crictl.yaml"), // not /etc/crictl.yaml
		"--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "10m",
		"pull"}
	args = append(append(args, extraArgs...), ref)
	for {
		out, err := runTool(ctx, bin, args...)
		if err == nil {
			return nil
		}
		if strings.Contains(string(out), "not initialized yet") && ctx.Err() == nil {
			select {
			case <-time.After(50 * time.Millisecond):
				continue
			case <-ctx.Done():
			}
		}
		return c.failure("crictl pull "+ref, out, err)
	}
}
