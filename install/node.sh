#!/usr/bin/env bash
# install/node.sh: install cove-node on a node as containerd's registry mirror, or remove it.
#
# The work is done by the cove-node binary itself (cove-node install / uninstall, see
# docs/node.md): it edits containerd's config.toml and hosts.toml with go-toml/v2, the
# library containerd parses them with, backs every file up before its first change, and
# has containerd check the result. This script finds the binary (--binary, default
# ./bin/cove-node; for --uninstall the installed one when there is no other), checks that
# it is cove-node, and hands it every other argument.
#
# What the install changes (all below --root-dir):
#   /usr/local/bin/cove-node                      the binary (--binary)
#   /etc/systemd/system/cove-node.service         the unit, Before=containerd.service
#   /etc/systemd/system/cove-node.socket          --content-hook only: the content socket
#   /etc/cove-node/cache-ca.pem                   --cache-ca only: the CA bundle for https caches
#   <hosts-dir>/_default/hosts.toml               cove-node as the first mirror of every registry
#   <containerd-config dir>/conf.d/cove-node.toml CRI's registry config_path = <hosts-dir>
#                                                 (--content-hook: and the proxy plugins)
#   <containerd-config>                           its `imports` lists that drop-in
#   /var/lib/cove-node/install-backup/            what was there before, for --uninstall
# Every file is backed up before its first change; a second run changes nothing more;
# --uninstall puts every file back byte for byte.
set -Eeuo pipefail
umask 022
export LC_ALL=C

readonly PROG=node.sh

usage() {
	cat <<'EOF_USAGE'
Usage:
  node.sh [options] --cache URL [--cache URL]...   install or update cove-node
  node.sh [--root-dir DIR] [--no-restart] --uninstall

Options:
  --root-dir DIR                 treat DIR as / (default /). Every path written into a config
                                 file (imports, config_path, ExecStart) gets DIR in front too, so
                                 a sandbox can run containerd and cove-node for real. Needs
                                 --no-restart unless DIR is /.
  --host-root DIR                the node's / is mounted at DIR (a DaemonSet's hostPath): files
                                 under it, configs name them as the node sees them. Needs
                                 --no-restart or --systemctl
  --systemctl CMD                the command that runs the node's systemctl (default systemctl)
  --no-restart                   touch no service (no systemctl at all); says what to run
  --content-hook                 also make cove-node containerd's content store and differ
                                 (proxy plugins on the socket unit cove-node.socket,
                                 /run/cove-node/content.sock); needs a version 3 or 4
                                 containerd config. Without it (the default): mirror-only,
                                 and a previous --content-hook install is switched back
  --uninstall                    restore every file as it was before the install, stop and
                                 disable cove-node.service (and cove-node.socket)
  --binary PATH                  the cove-node binary to install, and to run (default
                                 ./bin/cove-node; for --uninstall, the installed one if that
                                 is missing)
  --cache URL                    a cove-cache base URL, http(s)://HOST[:PORT] (repeatable, tried
                                 in order; at least one)
  --cache-ca FILE                PEM bundle of the CA certificates that verify https:// --cache
                                 URLs (instead of the system roots): installed as
                                 /etc/cove-node/cache-ca.pem and passed as cove-node --cache-ca.
                                 Without it, a bundle an earlier run installed is taken out
  --addr HOST:PORT               cove-node's loopback address, containerd's mirror
                                 (default 127.0.0.1:5006)
  --origin-plain-http HOST:PORT  cove-node reaches this origin over plain HTTP when it falls
                                 back (repeatable)
  --hosts-dir DIR                containerd's registry hosts directory
                                 (default /etc/containerd/certs.d)
  --containerd-config PATH       containerd's root config (default /etc/containerd/config.toml)
  --containerd-bin PATH          the containerd binary used to check the config (default:
                                 containerd on PATH, then /usr/local/bin, /usr/bin; skipped with
                                 a warning when there is none)
  -h, --help                     this text

Afterwards, `cove-node doctor` checks that containerd really pulls through cove-node.

Exit status: 0 done, 1 refused or failed (nothing changed), 2 bad usage (nothing changed).
EOF_USAGE
}

usage_error() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	printf 'Run %s --help for usage. Nothing was changed.\n' "$PROG" >&2
	exit 2
}

BINARY=./bin/cove-node
BINARY_SET=0
UNINSTALL=0
ROOT=
ARGS=()
while (($#)); do
	case $1 in
	-h | --help)
		usage
		exit 0
		;;
	--uninstall) UNINSTALL=1 && shift ;;
	--binary)
		if (($# < 2)); then usage_error "--binary needs a value"; fi
		BINARY=$2 && BINARY_SET=1 && shift 2
		;;
	--binary=*) BINARY=${1#*=} && BINARY_SET=1 && shift ;;
	--root-dir | --host-root)
		if (($# < 2)); then usage_error "$1 needs a value"; fi
		ROOT=$2 && ARGS+=("$1" "$2") && shift 2
		;;
	--root-dir=* | --host-root=*) ROOT=${1#*=} && ARGS+=("$1") && shift ;;
	*) ARGS+=("$1") && shift ;;
	esac
done

if ((UNINSTALL && !BINARY_SET)) && [[ ! -x $BINARY ]]; then
	# The installed binary can uninstall itself (Linux keeps a running file's inode).
	BINARY=${ROOT%/}/usr/local/bin/cove-node
	if [[ ! -x $BINARY && ! -e ${ROOT%/}/var/lib/cove-node/install-backup/manifest ]]; then
		printf '%s: nothing to uninstall: no /var/lib/cove-node/install-backup/manifest%s\n' "$PROG" "${ROOT:+ under $ROOT}"
		exit 0
	fi
fi
if [[ ! -f $BINARY || ! -x $BINARY ]]; then
	usage_error "--binary '$BINARY': no executable file there (build it with make build)"
fi
if ! v=$("$BINARY" version 2>&1) || [[ $v != cove-node* ]]; then
	usage_error "--binary '$BINARY': not cove-node ('$BINARY version' said: ${v:0:200})"
fi

if ((UNINSTALL)); then
	exec "$BINARY" uninstall "${ARGS[@]}"
fi
exec "$BINARY" install --binary "$BINARY" "${ARGS[@]}"
