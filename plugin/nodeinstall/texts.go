package nodeinstall

import (
	"fmt"
	"strings"

	"github.com/cove-oci/cove/plugin/content"
)

// unitFile is cove-node.service. ctdRoot and ctdAddress (content hook only) are
// containerd's root and gRPC socket as containerd reads them.
func (o *Options) unitFile(ctdRoot, ctdAddress string) string {
	args := []string{"serve", "--addr", o.Addr}
	if o.MetricsAddr != "" {
		args = append(args, "--metrics-addr", o.MetricsAddr)
	}
	for _, c := range o.Caches {
		args = append(args, "--cache", c)
	}
	if o.CacheCA != "" {
		args = append(args, "--cache-ca", o.Conf(CacheCAPath))
	}
	if o.CachesFrom != "" {
		args = append(args, "--caches-from-endpointslices", o.CachesFrom)
		if o.CachesPortName != "" {
			args = append(args, "--caches-port-name", o.CachesPortName)
		}
		args = append(args, "--kubeconfig", o.kubeconfigArg())
	}
	args = append(args, "--root", o.Conf(StateDir))
	for _, h := range o.PlainHTTP {
		args = append(args, "--origin-plain-http", h)
	}
	desc, socket, restartSec := "containerd's registry mirror on loopback", "", 1
	if o.ContentHook {
		args = append(args, "--content-socket", o.Conf(ContentSocket),
			"--content-root", ctdRoot+"/io.containerd.content.v1.content", "--containerd-address", ctdAddress)
		desc = "containerd's registry mirror, content store and differ"
		// containerd's content store is gone while cove-node is: come back at once (the
		// socket unit keeps the socket, so containerd's calls wait, not fail).
		socket = "\nRequires=" + SocketUnitName + "\nAfter=" + SocketUnitName
		restartSec = 0
	}
	return fmt.Sprintf(`# Installed by cove-node install (install/node.sh); cove-node uninstall removes it. See docs/install.md.
[Unit]
Description=cove-node: %s (cove cluster image cache)
Documentation=https://github.com/cove-oci/cove/blob/main/docs/install.md
Before=containerd.service
After=network-online.target
Wants=network-online.target%s

[Service]
Type=exec
ExecStart=%s %s
Restart=always
RestartSec=%d
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
`, desc, socket, o.Conf(BinPath), strings.Join(args, " "), restartSec)
}

// socketUnitFile holds the content hook's socket, so containerd's calls queue through a
// cove-node restart instead of failing.
func (o *Options) socketUnitFile() string {
	return `# Installed by cove-node install (install/node.sh); cove-node uninstall removes it. See docs/install.md.
[Unit]
Description=cove-node content hook socket (containerd's content store and differ)
Documentation=https://github.com/cove-oci/cove/blob/main/docs/install.md
Before=containerd.service

[Socket]
ListenStream=` + o.Conf(ContentSocket) + `
SocketMode=0660
DirectoryMode=0755
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
`
}

// dropinFile is the drop-in that points CRI's registry config_path at the hosts
// directory. Its version must not exceed the root config's (containerd 2.3 refuses a
// higher one; 2.0-2.2 take the highest version for the merged config and skip the root's
// migration), so it follows the root: 2 names the old CRI plugin, 3 the image service.
// With the content hook it starts with content.Fragment (version 3; the install refuses
// a version 2 root then).
func (o *Options) dropinFile(version int64) string {
	plugin, v := CRIv3, 3
	if version == 2 {
		plugin, v = CRIv2, 2
	}
	registry := fmt.Sprintf("[plugins.%q.registry]\n  config_path = %q\n", plugin, o.Conf(o.HostsDir))
	if o.ContentHook {
		return "# Written by cove-node install (install/node.sh); cove-node uninstall removes it. See docs/install.md.\n" +
			"# The content hook: cove-node serves containerd's content store and differ on\n" +
			"# " + o.Conf(ContentSocket) + " (held by cove-node.socket).\n" +
			content.Fragment(o.Conf(ContentSocket), o.Arch) +
			"\n# CRI (kubelet, crictl) reads registry hosts from this one directory, where\n" +
			"# _default/hosts.toml makes cove-node the first mirror of every registry.\n" + registry
	}
	return fmt.Sprintf("# Written by cove-node install (install/node.sh); cove-node uninstall removes it. See docs/install.md.\n"+
		"# CRI (kubelet, crictl) reads registry hosts from this one directory, where\n"+
		"# _default/hosts.toml makes cove-node the first mirror of every registry.\n"+
		"version = %d\n\n%s", v, registry)
}
