package content

import (
	"fmt"
	"strconv"
)

// Names of the proxy plugins in containerd's configuration. containerd registers a
// proxy plugin under its table name as the plugin ID (cmd/containerd/server/server.go,
// LoadPlugins: Registration{Type: io.containerd.content.v1 / io.containerd.differ.v1,
// ID: name}), so the differ is referenced as "cove-diff".
const (
	ContentProxyName = "cove"
	DiffProxyName    = "cove-diff"
	// BuiltinContentPlugin is the content plugin the hook replaces. containerd's
	// metadata plugin takes exactly one content plugin (ic.GetSingle), so it must be
	// disabled while the hook is on.
	BuiltinContentPlugin = "io.containerd.content.v1.content"
)

// Fragment returns the containerd configuration (version 3) that makes containerd use
// the hook on socket for content and for unpacking images of linux/arch (for example
// "amd64", "arm64"). It is meant to be merged into containerd's config.toml (or given
// as an imported drop-in, which containerd merges: disabled_plugins is appended,
// proxy_plugins entries are replaced by name, plugin tables are merged key by key).
//
// Source references, containerd v2.3.4:
//   - disabled_plugins: cmd/containerd/server/config/config.go (Config.DisabledPlugins);
//     plugins/metadata/plugin.go takes ic.GetSingle(plugins.ContentPlugin), which fails
//     with two content plugins, so the built-in one is disabled.
//   - [proxy_plugins.NAME] type/address: config.go ProxyPlugin; server.go LoadPlugins
//     accepts the types "content" and "diff".
//   - unpack_config (platform, snapshotter, differ): plugins/transfer/plugin.go
//     unpackConfiguration; getApplier resolves differ with
//     ic.GetByID(plugins.DiffPlugin, differ). Setting unpack_config replaces the
//     default list (plugin_defaults_linux.go: overlayfs + walking, and an optional
//     erofs entry), so both entries are restated with only the differ changed.
//     ctr image pull and CRI pulls (which use the transfer service unless
//     use_local_image_pull is set, internal/cri/server/images/image_pull.go) unpack
//     with it.
//   - [plugins."io.containerd.service.v1.diff-service"] default: the order in which
//     the diff service tries differs (plugins/services/diff/local.go, Order, falling
//     through on NotImplemented). Client-side unpacks use it: CRI with
//     use_local_image_pull, `ctr image pull --local`, nerdctl. "walking" stays second
//     so a compare (commit) still works when Diff answers Unimplemented.
func Fragment(socket string, arch string) string {
	q := strconv.Quote
	platform := "linux/" + arch
	return fmt.Sprintf(`version = 3
disabled_plugins = [%[1]s]

[proxy_plugins]
  [proxy_plugins.%[2]s]
    type = "content"
    address = %[4]s
  [proxy_plugins.%[3]s]
    type = "diff"
    address = %[4]s
    platform = %[5]s

[plugins]
  [plugins."io.containerd.service.v1.diff-service"]
    default = [%[6]s, "walking"]

  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = %[5]s
    snapshotter = "overlayfs"
    differ = %[6]s

  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = %[7]s
    snapshotter = "erofs"
    differ = "erofs"
    optional = true
`, q(BuiltinContentPlugin), q(ContentProxyName), q(DiffProxyName), q(socket), q(platform),
		q(DiffProxyName), q("linux(+erofs)/"+arch))
}
