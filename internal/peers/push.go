package peers

import (
	"context"
	"strings"
)

// WithPushMirror is WithMirror for a mirror that also receives pushes (capabilities
// pull, resolve and push): containerd pushes to the first host with the push capability
// only, so `ctr image push` goes through it (with ?ns=<registry> on every request).
func WithPushMirror(url string) ContainerdOption {
	return func(c *containerdConfig) {
		c.mirrors = append(c.mirrors, url)
		if c.pushMirrors == nil {
			c.pushMirrors = map[string]bool{}
		}
		c.pushMirrors[url] = true
	}
}

// Tag gives the image src the name dst (`ctr image tag --force`).
func (c *Containerd) Tag(ctx context.Context, src, dst string) error {
	out, err := c.ctr(ctx, "image", "tag", "--force", src, dst)
	if err != nil {
		return c.failure("ctr image tag "+src+" "+dst, out, err)
	}
	return nil
}

// Push pushes ref with `ctr image push --hosts-dir HostsDir` (the transfer service);
// extraArgs go before the reference (for example --user NAME:PASSWORD). It returns
// ctr's output.
func (c *Containerd) Push(ctx context.Context, ref string, extraArgs ...string) (string, error) {
	args := append([]string{"image", "push", "--hosts-dir", c.HostsDir}, extraArgs...)
	out, err := c.ctr(ctx, append(args, ref)...)
	if err != nil {
		return "", c.failure("ctr image push "+ref, out, err)
	}
	return strings.TrimSpace(string(out)), nil
}
