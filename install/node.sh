#!/usr/bin/env bash
# install/node.sh: install cove-node on a node as containerd's registry mirror, or remove it.
#
# cove-node runs beside containerd as the _default registry mirror on loopback (the
# resolver hook) and forwards pulls to cove-cache, falling back to the origin fast. Two
# modes: mirror-only (the default), where containerd keeps its built-in content store, and
# --content-hook, where cove-node also serves containerd's content store and differ as
# proxy plugins on a socket-activated unix socket (prefill).
#
# What it changes (all below --root-dir, see docs/install.md):
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
	cat <<'EOF'
Usage:
  node.sh [options] --cache URL [--cache URL]...   install or update cove-node
  node.sh [--root-dir DIR] [--no-restart] --uninstall

Options:
  --root-dir DIR                 treat DIR as / (default /). Every path written into a config
                                 file (imports, config_path, ExecStart) gets DIR in front too, so
                                 a sandbox can run containerd and cove-node for real. Needs
                                 --no-restart unless DIR is /.
  --no-restart                   touch no service (no systemctl at all)
  --content-hook                 also make cove-node containerd's content store and differ
                                 (proxy plugins on the socket unit cove-node.socket,
                                 /run/cove-node/content.sock); needs a version 3 or 4
                                 containerd config. Without it (the default): mirror-only,
                                 and a previous --content-hook install is switched back
  --uninstall                    restore every file as it was before the install, stop and
                                 disable cove-node.service (and cove-node.socket)
  --binary PATH                  the cove-node binary to install (default ./bin/cove-node)
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

Exit status: 0 done, 1 refused or failed (nothing changed), 2 bad usage (nothing changed).
EOF
}

# ---------------------------------------------------------------------------------------
# Settings.

ROOT_DIR=/
NO_RESTART=0
UNINSTALL=0
BINARY=./bin/cove-node
CACHES=()
CACHE_CA=
ADDR=127.0.0.1:5006
PLAIN_HTTP=()
HOSTS_DIR=/etc/containerd/certs.d
CTD_CONFIG=/etc/containerd/config.toml
CTD_BIN=

# MODE is the integration mode: "mirror" (the default): cove-node is containerd's
# _default registry mirror and containerd keeps its own content store; "content"
# (--content-hook): that, and cove-node serves containerd's content store and differ as
# proxy plugins on a socket held by cove-node.socket (see install_content_hook).
MODE=mirror

readonly BIN_PATH=/usr/local/bin/cove-node
readonly UNIT_NAME=cove-node.service
readonly UNIT_PATH=/etc/systemd/system/cove-node.service
readonly SOCKET_UNIT_NAME=cove-node.socket
readonly SOCKET_UNIT_PATH=/etc/systemd/system/cove-node.socket
readonly CACHE_CA_PATH=/etc/cove-node/cache-ca.pem
readonly CONTENT_SOCKET=/run/cove-node/content.sock
readonly CTD_DEFAULT_ROOT=/var/lib/containerd
readonly CTD_DEFAULT_ADDRESS=/run/containerd/containerd.sock
readonly STATE_DIR=/var/lib/cove-node
readonly BACKUP_DIR=/var/lib/cove-node/install-backup
readonly DIAL_TIMEOUT=300ms
readonly BEGIN_MARK='# BEGIN cove-node: managed by install/node.sh, removed by node.sh --uninstall'
readonly END_MARK='# END cove-node'
readonly IMPORT_NOTE='# added by cove install/node.sh'
# The CRI plugin that reads registry.config_path: version 2 configs name the single CRI
# plugin, version 3 and later the CRI image service (containerd 2.x migrates the former).
readonly CRI_V2='plugins."io.containerd.grpc.v1.cri"'
readonly CRI_V3='plugins."io.containerd.cri.v1.images"'

ROOT=           # ROOT_DIR without its trailing slash: "" for /
DROPIN=         # node paths derived from the flags
HOSTS_TOML=
CTD_ROOT=       # --content-hook: containerd's root and gRPC socket as containerd reads them
CTD_ADDRESS=
STAGE=          # scratch directory, removed at exit
CHANGING=0      # 1 once this run has changed a file: failures roll back
UNINSTALLING=0  # 1 while --uninstall changes files
RUN_PATHS=()    # host paths this run changed, in order (saved copies in $STAGE/run)
RUN_DIRS=()     # host directories this run created, in order
CHANGED_ROLES=" "

# ---------------------------------------------------------------------------------------
# Output, failure and rollback.

# Output never fails the run: with SIGPIPE ignored, a reader that went away (node.sh | head)
# makes printf fail, not kill the script halfway.
say() { printf '%s: %s\n' "$PROG" "$*" 2>/dev/null || true; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2 2>/dev/null || true; }
usage_error() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	printf 'Run %s --help for usage. Nothing was changed.\n' "$PROG" >&2
	exit 2
}
die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	if ((CHANGING)); then
		rollback
		printf '%s: rolled back: the files are as they were before this run.\n' "$PROG" >&2
	elif ((UNINSTALLING)); then
		printf '%s: the uninstall is not finished: run --uninstall again.\n' "$PROG" >&2
	else
		printf '%s: nothing was changed.\n' "$PROG" >&2
	fi
	exit 1
}
on_err() {
	trap - ERR
	die "unexpected failure (exit status $1) at line $2 of $PROG"
}
trap 'on_err $? $LINENO' ERR
trap '' PIPE
trap 'die "interrupted"' INT TERM HUP
cleanup() { if [[ -n $STAGE ]]; then rm -rf -- "$STAGE"; fi; }
trap cleanup EXIT

# R prints the host path of a node path: the node path under --root-dir.
R() { printf '%s%s' "$ROOT" "$1"; }

# run_save remembers the state of host path $1 before this run's first change to it.
run_save() {
	local p=$1 i
	for i in "${!RUN_PATHS[@]}"; do
		if [[ ${RUN_PATHS[$i]} == "$p" ]]; then return 0; fi
	done
	i=${#RUN_PATHS[@]}
	RUN_PATHS+=("$p")
	if [[ -e $p ]]; then cp -p -- "$p" "$STAGE/run.$i"; fi
}

# rollback undoes this run: files back as they were, directories it made removed.
rollback() {
	trap - ERR
	set +e
	local i p
	for ((i = ${#RUN_PATHS[@]} - 1; i >= 0; i--)); do
		p=${RUN_PATHS[$i]}
		if [[ -e $STAGE/run.$i ]]; then
			cp -p -- "$STAGE/run.$i" "$p"
		else
			rm -f -- "$p"
		fi
	done
	for ((i = ${#RUN_DIRS[@]} - 1; i >= 0; i--)); do
		rmdir -- "${RUN_DIRS[$i]}" 2>/dev/null
	done
	CHANGING=0
}

# ---------------------------------------------------------------------------------------
# Arguments.

need_arg() { if (($2 < 2)); then usage_error "$1 needs a value"; fi; }

parse_args() {
	local a v
	while (($#)); do
		a=$1
		v=
		if [[ $a == --*=* ]]; then
			v=${a#*=}
			a=${a%%=*}
			shift
			set -- "$a" "$v" "$@"
		fi
		case $a in
		-h | --help)
			usage
			exit 0
			;;
		--root-dir) need_arg "$a" $# && ROOT_DIR=$2 && shift 2 ;;
		--no-restart) NO_RESTART=1 && shift ;;
		--uninstall) UNINSTALL=1 && shift ;;
		--content-hook) MODE=content && shift ;;
		--binary) need_arg "$a" $# && BINARY=$2 && BINARY_SET=1 && shift 2 ;;
		--cache) need_arg "$a" $# && CACHES+=("$2") && shift 2 ;;
		--cache-ca) need_arg "$a" $# && CACHE_CA=$2 && CACHE_CA_SET=1 && shift 2 ;;
		--addr) need_arg "$a" $# && ADDR=$2 && ADDR_SET=1 && shift 2 ;;
		--origin-plain-http) need_arg "$a" $# && PLAIN_HTTP+=("$2") && shift 2 ;;
		--hosts-dir) need_arg "$a" $# && HOSTS_DIR=$2 && HOSTS_SET=1 && shift 2 ;;
		--containerd-config) need_arg "$a" $# && CTD_CONFIG=$2 && CONFIG_SET=1 && shift 2 ;;
		--containerd-bin) need_arg "$a" $# && CTD_BIN=$2 && shift 2 ;;
		*) usage_error "unknown argument '$1'" ;;
		esac
	done
}

# clean_path checks that $2 is an absolute path of plain characters (it goes into TOML
# strings and a systemd command line unquoted) and prints it without trailing slashes.
clean_path() {
	local name=$1 p=$2
	if [[ $p != /* ]]; then usage_error "$name '$p': want an absolute path"; fi
	if [[ ! $p =~ ^[A-Za-z0-9._/+@-]+$ ]]; then
		usage_error "$name '$p': only letters, digits and . _ / + @ - are allowed"
	fi
	if [[ /$p/ == */./* || /$p/ == */../* ]]; then usage_error "$name '$p': no . or .. components"; fi
	while [[ $p == *//* ]]; do p=${p//\/\//\/}; done
	while [[ $p == */ && $p != / ]]; do p=${p%/}; done
	printf '%s' "$p"
}

validate_args() {
	ROOT_DIR=$(clean_path --root-dir "$ROOT_DIR") || exit 2
	if [[ $ROOT_DIR == / ]]; then ROOT=; else ROOT=$ROOT_DIR; fi
	if [[ ! -d $ROOT_DIR ]]; then usage_error "--root-dir '$ROOT_DIR' is not a directory"; fi
	if [[ -n $ROOT && $NO_RESTART == 0 ]]; then
		usage_error "--root-dir $ROOT_DIR: services belong to the real root; add --no-restart"
	fi
	if ((UNINSTALL)); then
		if ((${#CACHES[@]} || ${#PLAIN_HTTP[@]})) || [[ $MODE != mirror || -n ${BINARY_SET:-}${CACHE_CA_SET:-}${ADDR_SET:-}${HOSTS_SET:-}${CONFIG_SET:-} ]]; then
			usage_error "--uninstall takes only --root-dir and --no-restart (the install recorded the rest)"
		fi
		return 0
	fi
	HOSTS_DIR=$(clean_path --hosts-dir "$HOSTS_DIR") || exit 2
	CTD_CONFIG=$(clean_path --containerd-config "$CTD_CONFIG") || exit 2
	if [[ $HOSTS_DIR == / || $CTD_CONFIG == / ]]; then usage_error "--hosts-dir and --containerd-config cannot be /"; fi
	DROPIN=$(dirname -- "$CTD_CONFIG")/conf.d/cove-node.toml
	HOSTS_TOML=$HOSTS_DIR/_default/hosts.toml

	if ((${#CACHES[@]} == 0)); then
		usage_error "--cache URL is required: the cove-cache to forward to (for example --cache http://cove-cache.cove-system.svc:5005)"
	fi
	local c h port
	for c in "${CACHES[@]}"; do
		if [[ ! $c =~ ^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:([0-9]{1,5}))?/?$ ]]; then
			usage_error "--cache '$c': want http(s)://HOST[:PORT] (no path, user or query)"
		fi
		port=${BASH_REMATCH[3]}
		if [[ -n $port ]] && ((10#$port < 1 || 10#$port > 65535)); then usage_error "--cache '$c': port out of range"; fi
	done
	if [[ $ADDR =~ ^(127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|localhost|\[::1\]):([0-9]{1,5})$ ]]; then
		h=${BASH_REMATCH[1]}
		port=${BASH_REMATCH[2]}
		if ((10#$port < 1 || 10#$port > 65535)); then usage_error "--addr '$ADDR': port out of range"; fi
		if [[ $h == 127.* ]]; then
			local -a octets
			IFS=. read -ra octets <<<"$h"
			for c in "${octets[@]}"; do
				if ((10#$c > 255)); then usage_error "--addr '$ADDR': not an IPv4 address"; fi
			done
		fi
	else
		usage_error "--addr '$ADDR': want a loopback HOST:PORT (127.0.0.1:5006, [::1]:5006, localhost:5006): cove-node serves this node's containerd only"
	fi
	for c in "${PLAIN_HTTP[@]}"; do
		if [[ ! $c =~ ^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$ ]]; then
			usage_error "--origin-plain-http '$c': want a registry HOST:PORT"
		fi
	done
	if [[ $MODE == content ]] && (($(R "$CONTENT_SOCKET" | wc -c) > 107)); then
		usage_error "--root-dir $ROOT_DIR: the content socket $(R "$CONTENT_SOCKET") is longer than a unix socket path can be (107 bytes)"
	fi
	if [[ -n ${CACHE_CA_SET:-} ]]; then
		if [[ -z $CACHE_CA ]]; then usage_error "--cache-ca needs a file"; fi
		if [[ ! -f $CACHE_CA || ! -r $CACHE_CA ]]; then usage_error "--cache-ca '$CACHE_CA': no readable file there"; fi
		local https=0
		for c in "${CACHES[@]}"; do if [[ $c == https://* ]]; then https=1; fi; done
		if ((!https)); then warn "--cache-ca: no --cache URL is https://, so cove-node will not use the bundle"; fi
	fi
	if [[ ! -f $BINARY || ! -x $BINARY ]]; then
		usage_error "--binary '$BINARY': no executable file there (build it with make build)"
	fi
	local v
	if ! v=$("$BINARY" version 2>&1) || [[ $v != cove-node* ]]; then
		usage_error "--binary '$BINARY': not cove-node ('$BINARY version' said: ${v:0:200})"
	fi
}

# ---------------------------------------------------------------------------------------
# TOML. containerd parses its config with go-toml; this scanner reads enough of TOML 1.0
# to find keys, arrays and tables, with their line numbers, and refuses what is not TOML.
# Records (tab-separated), one per line:
#   T line table                      a [table] or [[array of tables]] header
#   K line key type value             a scalar; key is dotted, quoted where needed,
#                                     array elements as key[N]; value escaped (\n \t \\)
#   A line key closeLine closeCol n trailingComma lastEndLine lastEndCol
#                                     an array: where its ] is, its length, whether a
#                                     comma follows the last element, where that ends
#   ERR line message                  a syntax error (exit status 1)
# Columns are 0-based byte offsets in their line.

IFS= read -r -d '' TOML_SCAN <<'AWK' || true
function err(m) { printf "ERR\t%d\t%s\n", LN, m; FAILED = 1; exit 1 }
function nl() { LN++; P++; LS = P }
function ws() { while (P <= N && (substr(S, P, 1) == " " || substr(S, P, 1) == "\t")) P++ }
function comment() { if (substr(S, P, 1) == "#") while (P <= N && substr(S, P, 1) != "\n") P++ }
function wsnl(  c) {
	while (P <= N) {
		c = substr(S, P, 1)
		if (c == " " || c == "\t" || c == "\r") P++
		else if (c == "\n") nl()
		else if (c == "#") comment()
		else break
	}
}
function eol() {
	ws(); comment()
	if (substr(S, P, 1) == "\r") P++
	if (P > N) return
	if (substr(S, P, 1) != "\n") err("expected the end of the line")
	nl()
}
function seg(s) {
	if (s ~ /^[A-Za-z0-9_-]+$/) return s
	gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s)
	return "\"" s "\""
}
function key(  k, s, st) {
	k = ""
	while (1) {
		ws()
		if (substr(S, P, 1) == "\"") s = basic()
		else if (substr(S, P, 1) == "\047") s = literal()
		else {
			st = P
			while (P <= N && substr(S, P, 1) ~ /[A-Za-z0-9_-]/) P++
			if (P == st) err("expected a key")
			s = substr(S, st, P - st)
		}
		k = (k == "" ? "" : k ".") seg(s)
		ws()
		if (substr(S, P, 1) != ".") return k
		P++
	}
}
function hex(n,  h) {
	h = substr(S, P + 2, n)
	if (length(h) != n || h !~ /^[0-9A-Fa-f]+$/) err("invalid unicode escape")
	return h
}
function basic(  o, c, e) {
	P++; o = ""
	while (1) {
		if (P > N) err("unterminated string")
		c = substr(S, P, 1)
		if (c == "\n") err("newline in a string")
		if (c == "\"") { P++; return o }
		if (c == "\\") {
			e = substr(S, P + 1, 1)
			if (e == "n") o = o "\n"
			else if (e == "t") o = o "\t"
			else if (e == "r") o = o "\r"
			else if (e == "b") o = o "\b"
			else if (e == "f") o = o "\f"
			else if (e == "e") o = o "\033"
			else if (e == "\"" || e == "\\") o = o e
			else if (e == "u") { o = o "\\u" hex(4); P += 4 }
			else if (e == "U") { o = o "\\U" hex(8); P += 8 }
			else err("invalid escape \\" e)
			P += 2
			continue
		}
		o = o c; P++
	}
}
function literal(  o, c) {
	P++; o = ""
	while (1) {
		if (P > N) err("unterminated string")
		c = substr(S, P, 1)
		if (c == "\n") err("newline in a string")
		if (c == "\047") { P++; return o }
		o = o c; P++
	}
}
function multiline(q,  o, c, n) {
	P += 3; o = ""
	if (substr(S, P, 1) == "\r") P++
	if (substr(S, P, 1) == "\n") nl()
	while (1) {
		if (P > N) err("unterminated multi-line string")
		c = substr(S, P, 1)
		if (c == q && substr(S, P, 3) == q q q) {
			n = 3
			while (substr(S, P + n, 1) == q) n++
			if (n > 5) err("too many quotes closing a multi-line string")
			o = o substr(S, P + 3, n - 3); P += n
			return o
		}
		if (c == "\n") { o = o c; nl(); continue }
		if (c == "\\" && q == "\"") { o = o c substr(S, P + 1, 1); if (substr(S, P + 1, 1) == "\n") nl(); else P += 2; continue }
		o = o c; P++
	}
}
function out(s) { gsub(/\\/, "\\\\", s); gsub(/\t/, "\\t", s); gsub(/\n/, "\\n", s); gsub(/\r/, "\\r", s); return s }
function define(k) {
	if (k in DEF) err("key " k " defined twice")
	if (k in TAB) err("key " k " is already a table")
	DEF[k] = 1
}
function value(k, kl,  c, t, m, d) {
	c = substr(S, P, 1)
	if (substr(S, P, 3) == "\"\"\"" || substr(S, P, 3) == "\047\047\047") { printf "K\t%d\t%s\tstring\t%s\n", kl, k, out(multiline(c)); return }
	if (c == "\"") { printf "K\t%d\t%s\tstring\t%s\n", kl, k, out(basic()); return }
	if (c == "\047") { printf "K\t%d\t%s\tstring\t%s\n", kl, k, out(literal()); return }
	if (c == "[") { array(k, kl); return }
	if (c == "{") { inline(k); return }
	if (!match(substr(S, P, 100), /^[-+0-9A-Za-z_.:]+/)) err("expected a value")
	t = substr(S, P, RLENGTH)
	d = "^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]$"
	if (t ~ d && substr(S, P + RLENGTH, 1) == " " && substr(S, P + RLENGTH + 1, 1) ~ /[0-9]/) {
		match(substr(S, P + RLENGTH + 1, 100), /^[-+0-9A-Za-z_.:]+/)
		t = t " " substr(S, P + length(t) + 1, RLENGTH)
	}
	if (t == "true" || t == "false") m = "bool"
	else if (t ~ /^[-+]?(0|[1-9](_?[0-9])*)$/) m = "int"
	else if (t ~ /^0x[0-9A-Fa-f](_?[0-9A-Fa-f])*$/ || t ~ /^0o[0-7](_?[0-7])*$/ || t ~ /^0b[01](_?[01])*$/) m = "int"
	else if (t ~ /^[-+]?(inf|nan)$/) m = "float"
	else if (t ~ /^[-+]?(0|[1-9](_?[0-9])*)(\.[0-9](_?[0-9])*)?([eE][-+]?[0-9](_?[0-9])*)?$/) m = "float"
	else if (t ~ /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]([Tt ][0-9][0-9]:[0-9][0-9](:[0-9][0-9](\.[0-9]+)?)?([Zz]|[-+][0-9][0-9]:[0-9][0-9])?)?$/) m = "datetime"
	else if (t ~ /^[0-9][0-9]:[0-9][0-9](:[0-9][0-9](\.[0-9]+)?)?$/) m = "datetime"
	else err("invalid value " t)
	P += length(t)
	printf "K\t%d\t%s\t%s\t%s\n", kl, k, m, t
}
function array(k, kl,  n, tr, el, ec, c) {
	P++; n = 0; tr = 0; el = 0; ec = 0
	while (1) {
		wsnl()
		if (P > N) err("unterminated array")
		if (substr(S, P, 1) == "]") break
		value(k "[" n "]", LN)
		n++; tr = 0; el = LN; ec = P - LS
		wsnl()
		c = substr(S, P, 1)
		if (c == ",") { P++; tr = 1; continue }
		if (c == "]") break
		err("expected , or ] in the array " k)
	}
	printf "A\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\n", kl, k, LN, P - LS, n, tr, el, ec
	P++
}
function inline(k,  kk, c) {
	P++; ws()
	if (substr(S, P, 1) == "}") { P++; return }
	while (1) {
		kk = k "." key()
		ws()
		if (substr(S, P, 1) != "=") err("expected = after the key " kk)
		P++; ws()
		define(kk)
		value(kk, LN)
		ws()
		c = substr(S, P, 1)
		if (c == ",") { P++; continue }
		if (c == "}") { P++; return }
		err("expected , or } in the inline table " k)
	}
}
function parse(  c, k, cur, kl) {
	N = length(S); P = 1; LN = 1; LS = 1; cur = ""
	while (P <= N) {
		ws()
		c = substr(S, P, 1)
		if (c == "#") { comment(); continue }
		if (c == "\r") { P++; continue }
		if (c == "\n") { nl(); continue }
		if (P > N) break
		if (c == "[") {
			kl = LN
			if (substr(S, P + 1, 1) == "[") {
				P += 2; k = key(); ws()
				if (substr(S, P, 2) != "]]") err("expected ]] after the table name")
				P += 2
				if (k in DEF) err("key " k " is not an array of tables")
				cur = k "[" (AOT[k]++) "]"
			} else {
				P++; k = key(); ws()
				if (substr(S, P, 1) != "]") err("expected ] after the table name")
				P++
				if (k in TAB) err("table [" k "] defined twice")
				if (k in DEF) err("table [" k "] is already a key")
				TAB[k] = 1; cur = k
			}
			printf "T\t%d\t%s\n", kl, cur
			eol()
			continue
		}
		kl = LN
		k = key(); ws()
		if (substr(S, P, 1) != "=") err("expected = after the key " k)
		P++; ws()
		if (cur != "") k = cur "." k
		define(k)
		value(k, kl)
		eol()
	}
}
{ S = S $0 "\n" }
END { if (!FAILED) parse() }
AWK
readonly TOML_SCAN

# toml_scan FILE OUT: scan FILE into OUT; on a syntax error print "line N: message" and fail.
toml_scan() {
	if awk "$TOML_SCAN" "$1" >"$2"; then return 0; fi
	awk -F'\t' '$1 == "ERR" { printf "line %s: %s", $2, $3 }' "$2"
	return 1
}

# rec_get RECORDS KEY: the value of scalar KEY ("" and status 1 when absent).
rec_get() {
	awk -F'\t' -v k="$2" '$1 == "K" && $3 == k { print $5; f = 1; exit } END { exit !f }' "$1"
}

# rec_array RECORDS KEY: the A record of array KEY (status 1 when absent).
rec_array() {
	awk -F'\t' -v k="$2" '$1 == "A" && $3 == k { print; f = 1; exit } END { exit !f }' "$1"
}

# rec_elems RECORDS KEY: the string elements of array KEY, one per line.
rec_elems() {
	awk -F'\t' -v k="$2" '$1 == "K" && index($3, k "[") == 1 && substr($3, length(k) + 2) ~ /^[0-9]+\]$/ { print $5 }' "$1"
}

# ---------------------------------------------------------------------------------------
# Changing files: every change goes through put_file (or the manifest helpers), which
# back the file up once for --uninstall and remember it for this run's rollback.

manifest() { R "$BACKUP_DIR/manifest"; }
hashes() { R "$BACKUP_DIR/installed.sha256"; }

# manifest_add KIND ROLE PATH records a node path: KIND dir (made by the install), new
# (absent before) or mod (backed up under files/); ROLE names what it is.
manifest_add() {
	local m
	m=$(manifest)
	if [[ -f $m ]] && grep -qxF -- "$1"$'\t'"$2"$'\t'"$3" "$m"; then return 0; fi
	run_save "$m"
	printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$m"
}

in_manifest() {
	local m
	m=$(manifest)
	[[ -f $m ]] && awk -F'\t' -v p="$1" '$3 == p { f = 1 } END { exit !f }' "$m"
}

# mkdir_run makes host directory $1 and its missing parents, for this run only (rollback).
mkdir_run() {
	local d=$1 todo=()
	while [[ ! -d $d ]]; do
		todo=("$d" "${todo[@]}")
		d=$(dirname -- "$d")
	done
	for d in "${todo[@]}"; do
		mkdir -m 0755 -- "$d"
		RUN_DIRS+=("$d")
	done
}

# make_dirs makes node directory $1 and its missing parents, recorded for --uninstall.
make_dirs() {
	local d=$1 todo=()
	while [[ ! -d $(R "$d") ]]; do
		if [[ -e $(R "$d") || -L $(R "$d") ]]; then die "$(R "$d") exists and is not a directory"; fi
		todo=("$d" "${todo[@]}")
		d=$(dirname -- "$d")
	done
	for d in "${todo[@]}"; do
		mkdir -m 0755 -- "$(R "$d")"
		RUN_DIRS+=("$(R "$d")")
	done
	for d in "${todo[@]}"; do manifest_add dir dir "$d"; done
}

# record_original backs node path $2 up before the install's first change to it.
record_original() {
	local role=$1 p=$2 hp b
	hp=$(R "$p")
	if in_manifest "$p"; then return 0; fi
	if [[ -e $hp ]]; then
		b=$(R "$BACKUP_DIR/files$p")
		mkdir_run "$(dirname -- "$b")"
		run_save "$b"
		cp -p -- "$hp" "$b"
		manifest_add mod "$role" "$p"
		say "backed up $p to $BACKUP_DIR/files$p"
	else
		manifest_add new "$role" "$p"
	fi
}

# put_file ROLE PATH SRC MODE makes node path PATH hold exactly SRC's bytes. An existing
# file keeps its owner and mode; a new one gets MODE.
put_file() {
	local role=$1 p=$2 src=$3 mode=$4 hp tmp
	hp=$(R "$p")
	if [[ -L $hp ]]; then die "$hp is a symbolic link: pass the file it points to instead"; fi
	if [[ -e $hp && ! -f $hp ]]; then die "$hp exists and is not a regular file"; fi
	if [[ -f $hp ]] && cmp -s -- "$src" "$hp"; then
		say "unchanged: $p"
		return 0
	fi
	make_dirs "$(dirname -- "$p")"
	record_original "$role" "$p"
	run_save "$hp"
	tmp=$hp.cove-tmp.$$
	run_save "$tmp"
	cp -- "$src" "$tmp"
	if [[ -f $hp ]]; then
		chmod --reference="$hp" -- "$tmp"
		chown --reference="$hp" -- "$tmp" 2>/dev/null || true
		say "updated: $p"
	else
		chmod "$mode" -- "$tmp"
		say "created: $p"
	fi
	mv -f -- "$tmp" "$hp"
	CHANGED_ROLES+="$role "
}

changed() { [[ $CHANGED_ROLES == *" $1 "* ]]; }

file_hash() { sha256sum -- "$1" | cut -d' ' -f1; }

# write_hashes records what each file the install manages holds now, so --uninstall can
# tell a file the install left from one somebody edited since.
write_hashes() {
	local out=$STAGE/hashes kind role p
	: >"$out"
	while IFS=$'\t' read -r kind role p; do
		if [[ $kind != dir && -f $(R "$p") ]]; then
			printf '%s\t%s\n' "$(file_hash "$(R "$p")")" "$p" >>"$out"
		fi
	done <"$(manifest)"
	if [[ -f $(hashes) ]] && cmp -s -- "$out" "$(hashes)"; then return 0; fi
	run_save "$(hashes)"
	cp -- "$out" "$(hashes)"
}

# ---------------------------------------------------------------------------------------
# What the install writes.

hosts_block() {
	printf '%s\n' "$BEGIN_MARK"
	printf '# cove-node on loopback, tried first for every registry without a directory of its own\n'
	printf '# here; when it fails containerd tries the next mirror, then the registry itself.\n'
	printf '[host."http://%s"]\n' "$ADDR"
	printf '  capabilities = ["pull", "resolve"]\n'
	printf '  dial_timeout = "%s"\n' "$DIAL_TIMEOUT"
	printf '%s\n' "$END_MARK"
}

# strip_block FILE: FILE without the cove-node block.
strip_block() {
	awk -v b="$BEGIN_MARK" -v e="$END_MARK" '$0 == b { skip = 1 } !skip { print } skip && $0 == e { skip = 0 }' "$1"
}

unit_file() {
	local args c
	args="serve --addr $ADDR"
	for c in "${CACHES[@]}"; do args+=" --cache $c"; done
	if [[ -n $CACHE_CA ]]; then args+=" --cache-ca $(R "$CACHE_CA_PATH")"; fi
	args+=" --root $(R "$STATE_DIR")"
	for c in "${PLAIN_HTTP[@]}"; do args+=" --origin-plain-http $c"; done
	local desc="containerd's registry mirror on loopback" socket='' restart_sec=1
	if [[ $MODE == content ]]; then
		args+=" --content-socket $(R "$CONTENT_SOCKET") --content-root $CTD_ROOT/io.containerd.content.v1.content --containerd-address $CTD_ADDRESS"
		desc="containerd's registry mirror, content store and differ"
		# containerd's content store is gone while cove-node is: come back at once (the
		# socket unit keeps the socket, so containerd's calls wait, not fail).
		socket=$'\n'"Requires=$SOCKET_UNIT_NAME"$'\n'"After=$SOCKET_UNIT_NAME"
		restart_sec=0
	fi
	cat <<EOF
# Installed by cove install/node.sh; node.sh --uninstall removes it. See docs/install.md.
[Unit]
Description=cove-node: $desc (cove cluster image cache)
Documentation=https://github.com/cove-oci/cove/blob/main/docs/install.md
Before=containerd.service
After=network-online.target
Wants=network-online.target$socket

[Service]
Type=exec
ExecStart=$(R "$BIN_PATH") $args
Restart=always
RestartSec=$restart_sec
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
EOF
}

# dropin_file VERSION: the drop-in that points CRI's registry config_path at the hosts
# directory. Its version must not exceed the root config's (containerd 2.3 refuses a
# higher one; 2.0-2.2 take the highest version for the merged config and skip the root's
# migration), so it follows the root: 2 names the old CRI plugin, 3 the image service.
# In content-hook mode it starts with the fragment cove-node print-containerd-config
# printed ($STAGE/fragment.toml, version 3; install_content_hook refuses a version 2 root).
dropin_file() {
	local plugin=$CRI_V3 version=3
	if (($1 == 2)); then plugin=$CRI_V2 version=2; fi
	if [[ $MODE == content ]]; then
		cat <<EOF
# Written by cove install/node.sh; node.sh --uninstall removes it. See docs/install.md.
# The content hook: cove-node serves containerd's content store and differ on
# $(R "$CONTENT_SOCKET") (held by cove-node.socket). From cove-node print-containerd-config:
$(cat -- "$STAGE/fragment.toml")

# CRI (kubelet, crictl) reads registry hosts from this one directory, where
# _default/hosts.toml makes cove-node the first mirror of every registry.
[$plugin.registry]
  config_path = "$(R "$HOSTS_DIR")"
EOF
		return 0
	fi
	cat <<EOF
# Written by cove install/node.sh; node.sh --uninstall removes it. See docs/install.md.
# CRI (kubelet, crictl) reads registry hosts from this one directory, where
# _default/hosts.toml makes cove-node the first mirror of every registry.
version = $version

[$plugin.registry]
  config_path = "$(R "$HOSTS_DIR")"
EOF
}

# socket_unit_file: the socket unit that holds the content hook's socket, so containerd's
# calls queue through a cove-node restart instead of failing (containerd's content store
# is cove-node's while the hook is on).
socket_unit_file() {
	cat <<EOF
# Installed by cove install/node.sh; node.sh --uninstall removes it. See docs/install.md.
[Unit]
Description=cove-node content hook socket (containerd's content store and differ)
Documentation=https://github.com/cove-oci/cove/blob/main/docs/install.md
Before=containerd.service

[Socket]
ListenStream=$(R "$CONTENT_SOCKET")
SocketMode=0660
DirectoryMode=0755
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
EOF
}

# install_content_hook VERSION RECORDS (--content-hook): checks the root config (its
# VERSION and scanned RECORDS; RECORDS empty when there is none), finds containerd's root
# and gRPC socket, and stages the fragment that switches the hook on
# ($STAGE/fragment.toml): `<binary> print-containerd-config --content-socket SOCKET`
# (version 3: disabled_plugins = the built-in content store, [proxy_plugins.cove] and
# [proxy_plugins.cove-diff], the transfer service's unpack_config, the diff service's
# order). The socket unit, the unit's flags and the drop-in follow from these; all go
# through put_file, so backup, idempotence and --uninstall are the mirror-only ones.
install_content_hook() {
	local version=$1 recs=$2 m sock
	sock=$(R "$CONTENT_SOCKET")
	if ((version == 2)); then
		die "$CTD_CONFIG has version = 2: the content hook's containerd fragment is version 3 (plugin names and disabled_plugins differ in version 2, and a drop-in cannot be newer than its root config). Migrate the config first (containerd config migrate > new.toml, review, replace; containerd 2.x's default config is version 3 or 4), or install without --content-hook (mirror-only)"
	fi
	CTD_ROOT=$(R "$CTD_DEFAULT_ROOT")
	CTD_ADDRESS=$(R "$CTD_DEFAULT_ADDRESS")
	if [[ -n $recs ]]; then
		# Paths in the config are as containerd reads them: used as they are.
		if m=$(rec_get "$recs" root); then CTD_ROOT=$m; fi
		if m=$(rec_get "$recs" grpc.address); then CTD_ADDRESS=$m; fi
	fi
	local name v
	for name in root grpc.address; do
		if [[ $name == root ]]; then v=$CTD_ROOT; else v=$CTD_ADDRESS; fi
		if [[ $v != /* || ! $v =~ ^[A-Za-z0-9._/+@-]+$ || /$v/ == */../* ]]; then
			die "$CTD_CONFIG sets $name = \"$v\": the content hook needs an absolute path of plain characters (letters, digits, . _ / + @ -) to pass to cove-node"
		fi
	done
	while [[ $CTD_ROOT == */ && $CTD_ROOT != / ]]; do CTD_ROOT=${CTD_ROOT%/}; done
	if ! "$BINARY" print-containerd-config --content-socket "$sock" >"$STAGE/fragment.toml" 2>"$STAGE/fragment.err"; then
		die "$BINARY print-containerd-config failed: $(head -c 500 -- "$STAGE/fragment.err")"
	fi
	if ! m=$(toml_scan "$STAGE/fragment.toml" "$STAGE/fragment.recs"); then
		die "$BINARY print-containerd-config printed invalid TOML ($m)"
	fi
	if [[ $(rec_get "$STAGE/fragment.recs" version || true) != 3 ]] ||
		[[ $(rec_get "$STAGE/fragment.recs" proxy_plugins.cove.address || true) != "$sock" ]]; then
		die "$BINARY print-containerd-config printed no version 3 fragment with [proxy_plugins.cove] on $sock: is it the cove-node of this script's release?"
	fi
}

# uninstall_socket_unit (mirror-only mode): a socket unit an earlier --content-hook run
# installed goes, as --uninstall would take it (removed, or its backup back).
uninstall_socket_unit() { take_out socket "$SOCKET_UNIT_PATH" "content hook off"; }

# take_out ROLE PATH WHY: a file an earlier run installed and this run does not want goes,
# as --uninstall would take it (removed, or its backup back).
take_out() {
	local role=$1 p=$2 why=$3 hp kind
	hp=$(R "$p")
	if [[ ! -e $hp ]] || ! in_manifest "$p"; then return 0; fi
	kind=$(awk -F'\t' -v p="$p" '$3 == p { print $1; exit }' "$(manifest)")
	run_save "$hp"
	if [[ $kind == mod ]]; then
		if cmp -s -- "$(R "$BACKUP_DIR/files$p")" "$hp"; then return 0; fi
		cp -p -- "$(R "$BACKUP_DIR/files$p")" "$hp"
		say "restored ($why): $p"
	else
		rm -f -- "$hp"
		say "removed ($why): $p"
	fi
	CHANGED_ROLES+="$role "
}

# stage_cache_ca OUT: checks that --cache-ca is a PEM bundle of certificates, as cove-node
# reads it (at least one CERTIFICATE block, each one a certificate; no private key), and
# copies it to OUT.
stage_cache_ca() {
	local out=$1 f=$CACHE_CA n m
	cp -- "$f" "$out" || die "--cache-ca '$f': cannot read it"
	if grep -qE -- '^-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY-----' "$out"; then
		die "--cache-ca '$f' holds a private key: give the CA certificates only (the bundle is installed world-readable)"
	fi
	# Every BEGIN CERTIFICATE has its END, and the base64 between them decodes.
	if ! m=$(awk '
		{ sub(/\r$/, "") }
		/^-----BEGIN CERTIFICATE-----$/ { if (in_) { print "line " NR ": BEGIN CERTIFICATE inside a certificate"; bad = 1; exit } in_ = 1; n++; b64 = ""; next }
		/^-----END CERTIFICATE-----$/ {
			if (!in_) { print "line " NR ": END CERTIFICATE without BEGIN"; bad = 1; exit }
			in_ = 0
			if (b64 == "" || length(b64) % 4 != 0 || b64 !~ /^[A-Za-z0-9+\/]+=?=?$/) { print "certificate " n ": not base64"; bad = 1; exit }
			next
		}
		in_ { if ($0 ~ /^[A-Za-z0-9+\/=]*$/) b64 = b64 $0; else { print "line " NR ": not base64 inside certificate " n; bad = 1; exit } }
		END {
			if (bad) exit 1
			if (in_) { print "certificate " n " has no END CERTIFICATE line"; exit 1 }
			if (n == 0) { print "no -----BEGIN CERTIFICATE----- block"; exit 1 }
			print n
		}' "$out"); then
		die "--cache-ca '$f' is not a PEM certificate bundle ($m)"
	fi
	n=$m
	if command -v openssl >/dev/null; then
		# Each certificate parses (openssl reads the first block of what it is given).
		local i
		for ((i = 1; i <= n; i++)); do
			if ! awk -v want="$i" '/^-----BEGIN CERTIFICATE-----/ { k++ } k == want { print } /^-----END CERTIFICATE-----/ && k == want { exit }' "$out" |
				openssl x509 -noout >/dev/null 2>&1; then
				die "--cache-ca '$f': certificate $i of $n is not a valid X.509 certificate"
			fi
		done
	fi
	say "--cache-ca: $n CA certificate(s) from $f"
}

# ---------------------------------------------------------------------------------------
# containerd.

find_containerd() {
	local c
	if [[ -n $CTD_BIN ]]; then
		if [[ ! -x $CTD_BIN ]]; then usage_error "--containerd-bin '$CTD_BIN': not an executable"; fi
		return 0
	fi
	if c=$(command -v containerd); then
		CTD_BIN=$c
		return 0
	fi
	for c in /usr/local/bin/containerd /usr/bin/containerd; do
		if [[ -x $c ]]; then
			CTD_BIN=$c
			return 0
		fi
	done
	warn "no containerd binary found (--containerd-bin): the result is not checked by containerd itself"
}

# check_containerd_version refuses containerd 1.x: its drop-ins replace whole plugin
# sections (services/server/config/config.go, mergeConfig, v1.7.x), so a drop-in setting
# registry.config_path would wipe the node's whole CRI configuration.
check_containerd_version() {
	[[ -n $CTD_BIN ]] || return 0
	local v
	v=$("$CTD_BIN" --version 2>/dev/null) || die "$CTD_BIN --version failed"
	if [[ $v =~ [[:space:]]v?([0-9]+)\.([0-9]+)\.[0-9]+ ]]; then
		if ((BASH_REMATCH[1] < 2)); then
			die "containerd ${BASH_REMATCH[1]}.${BASH_REMATCH[2]} is not supported (2.0 or later is): containerd 1.x replaces a whole plugin section with a drop-in's, so the drop-in would erase this node's CRI settings. See docs/install.md."
		fi
		CTD_VERSION=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}
	else
		warn "cannot read a version from '$v'"
	fi
}

# ctd_dump OUT: containerd's own view of the root config with its imports, scanned.
ctd_dump() {
	local err=$STAGE/dump.err
	if ! "$CTD_BIN" --config "$(R "$CTD_CONFIG")" config dump >"$STAGE/dump.toml" 2>"$err"; then
		printf '%s' "$(grep -v 'level=warning' "$err" | tail -n 5)"
		return 1
	fi
	toml_scan "$STAGE/dump.toml" "$1"
}

# ---------------------------------------------------------------------------------------
# Install.

# import_covers PATTERN: does the import PATTERN (already resolved) load the drop-in?
# filepath.Glob semantics: * and ? do not cross a /.
import_covers() {
	local pat=$1 target
	target=$(R "$DROPIN")
	if [[ $pat == "$target" ]]; then return 0; fi
	if [[ $pat == *[*?[]* ]]; then
		# shellcheck disable=SC2053 # the pattern is meant to match
		if [[ $target == $pat ]]; then
			local a=${pat//[!\/]/} b=${target//[!\/]/}
			[[ ${#a} == "${#b}" ]] && return 0
		fi
	fi
	return 1
}

# resolve_import PARENT PATH: an import as containerd resolves it (relative to its file).
resolve_import() {
	local p=$2
	if [[ $p != /* ]]; then p=$(dirname -- "$1")/$p; fi
	while [[ $p == *//* ]]; do p=${p//\/\//\/}; done
	printf '%s' "$p"
}

# check_cri_registry walks the root config and what it imports (as containerd does, the
# drop-in excepted) and refuses settings the drop-in would fight: another CRI registry
# config_path, or the deprecated registry.mirrors (containerd refuses it together with
# config_path: internal/cri/config/config.go, ValidateImageConfig).
check_cri_registry() {
	local queue=("$(R "$CTD_CONFIG")") seen=" " f recs imp m want line key val i=0
	want=$(R "$HOSTS_DIR")
	while ((${#queue[@]})); do
		f=${queue[0]}
		queue=("${queue[@]:1}")
		if [[ $seen == *" $f "* ]]; then continue; fi
		seen+="$f "
		if [[ $f == "$(R "$DROPIN")" ]]; then continue; fi
		if [[ ! -f $f ]]; then die "$f is imported by the containerd config but does not exist: containerd cannot start with this config"; fi
		recs=$STAGE/walk.$((i++))
		if ! m=$(toml_scan "$f" "$recs"); then die "$f is not valid TOML ($m): containerd cannot load it; fix it first"; fi
		while IFS=$'\t' read -r line key val; do
			case $key in
			*.registry.config_path)
				# "" is unset: containerd config default writes config_path = '' and a
				# later non-empty value wins the merge.
				if [[ -z $val ]]; then continue; fi
				if [[ $val != "$want" ]]; then
					die "$f line $line already sets CRI's registry config_path ($key = \"$val\"). cove needs it to be $want, a single directory; change that line (or pass --hosts-dir $val if it is a single hosts directory), then run this again."
				fi
				say "$f line $line already sets CRI's registry config_path to $want"
				;;
			*.registry.mirrors.*)
				die "$f line $line uses the deprecated CRI registry.mirrors ($key): containerd refuses it together with config_path. Move those mirrors to hosts.toml files under $HOSTS_DIR and remove registry.mirrors, then run this again."
				;;
			esac
		done < <(awk -F'\t' -v a="$CRI_V2.registry." -v b="$CRI_V3.registry." \
			'$1 == "K" && (index($3, a) == 1 || index($3, b) == 1) { print $2 "\t" $3 "\t" $5 }' "$recs")
		while IFS= read -r imp; do
			imp=$(resolve_import "$f" "$imp")
			if [[ $imp == *'*'* ]]; then
				while IFS= read -r m; do queue+=("$m"); done < <(compgen -G "$imp" || true)
			else
				queue+=("$imp")
			fi
		done < <(rec_elems "$recs" imports)
	done
}

# stage_root_config OUT RECORDS: the root config with the drop-in in its imports.
# Minimal edits: a new `imports = [...]` line after `version`, or the drop-in appended to
# the existing array, so everything else stays byte for byte.
stage_root_config() {
	local out=$1 recs=$2 cfg arr imp covered=0 line ccol n trailing lline lcol q
	cfg=$(R "$CTD_CONFIG")
	q="\"$(R "$DROPIN")\""
	while IFS= read -r imp; do
		if import_covers "$(resolve_import "$cfg" "$imp")"; then covered=1; fi
	done < <(rec_elems "$recs" imports)
	if ((covered)); then
		cp -- "$cfg" "$out"
		return 0
	fi
	if ! arr=$(rec_array "$recs" imports); then
		line=$(awk -F'\t' '$1 == "K" && $3 == "version" { print $2; exit }' "$recs")
		LINE_TEXT="imports = [$q]  $IMPORT_NOTE" awk -v at="$line" '{ print } NR == at { print ENVIRON["LINE_TEXT"] }' "$cfg" >"$out"
		return 0
	fi
	IFS=$'\t' read -r _ line _ cline ccol n trailing lline lcol <<<"$arr"
	if ((n == 0)); then
		# imports = [] : put the element inside the brackets.
		INS="$q" awk -v l="$cline" -v c="$ccol" 'NR == l { $0 = substr($0, 1, c) ENVIRON["INS"] substr($0, c + 1) } { print }' "$cfg" >"$out"
	elif ((cline == line)) || [[ $(awk -v l="$cline" -v c="$ccol" 'NR == l { print substr($0, 1, c) }' "$cfg") =~ [^[:space:]] ]]; then
		# One-line array, or ] after an element: append before the ].
		if ((trailing)); then INS=" $q,"; else INS=", $q"; fi
		INS=$INS awk -v l="$cline" -v c="$ccol" 'NR == l { $0 = substr($0, 1, c) ENVIRON["INS"] substr($0, c + 1) } { print }' "$cfg" >"$out"
	else
		# Multi-line array closed on its own line: a comma after the last element if it
		# has none, then the drop-in on a line of its own, indented like the last element.
		INS="$q," awk -v l="$cline" -v ll="$lline" -v lc="$lcol" -v tr="$trailing" '
			NR == ll { ind = $0; sub(/[^ \t].*$/, "", ind); if (!tr) $0 = substr($0, 1, lc) "," substr($0, lc + 1) }
			NR == l { print ind ENVIRON["INS"] }
			{ print }' "$cfg" >"$out"
	fi
}

# unstage_root_config IN OUT: IN without the drop-in import the install added (for an
# --uninstall after somebody else edited the file).
unstage_root_config() {
	local q
	q="\"$(R "$DROPIN")\""
	LINE_TEXT="imports = [$q]  $IMPORT_NOTE" Q=$q awk '
		$0 == ENVIRON["LINE_TEXT"] { next }
		{ line = $0; t = line; gsub(/^[ \t]+|[ \t]+$/, "", t) }
		t == ENVIRON["Q"] "," || t == ENVIRON["Q"] { next }
		{
			n = split(", " ENVIRON["Q"] "|" ENVIRON["Q"] ", |" ENVIRON["Q"], pats, "|")
			if (line ~ /^[ \t]*imports[ \t]*=/ || index(line, ENVIRON["Q"])) {
				for (i = 1; i <= n; i++) {
					j = index(line, pats[i])
					if (j) { line = substr(line, 1, j - 1) substr(line, j + length(pats[i])); break }
				}
			}
			print line
		}' "$1" >"$2"
}

# stage_hosts OUT: _default/hosts.toml with the cove-node block first. Other mirrors stay,
# after it, byte for byte; a previous cove-node block is replaced.
stage_hosts() {
	local out=$1 hp recs=$STAGE/hosts.recs m first base=$STAGE/hosts.base
	hp=$(R "$HOSTS_TOML")
	hosts_block >"$STAGE/block"
	if [[ ! -f $hp ]]; then
		cp -- "$STAGE/block" "$out"
		return 0
	fi
	if ! m=$(toml_scan "$hp" "$recs"); then
		die "$hp is not valid TOML ($m). containerd ignores every mirror in a file it cannot parse; fix it first"
	fi
	strip_block "$hp" >"$base"
	if ! m=$(toml_scan "$base" "$recs"); then
		die "$hp without its cove-node block is not valid TOML ($m); fix it first"
	fi
	if awk -F'\t' -v k="host.\"http://$ADDR\"" '$1 == "T" && ($3 == k || index($3, k ".") == 1) { f = 1 } END { exit !f }' "$recs"; then
		die "$hp already lists http://$ADDR outside the cove-node block; remove that entry or pick another --addr"
	fi
	if rec_get "$recs" server >/dev/null; then
		warn "$hp sets server = \"$(rec_get "$recs" server)\": in _default that replaces the origin of every registry"
	fi
	first=$(awk -F'\t' '$1 == "T" { print $2; exit }' "$recs")
	if [[ -n $first ]]; then
		# Before the first table, and before the comment lines right above it (they
		# describe that mirror), never before a top-level key.
		awk -v at="$first" -v blk="$STAGE/block" '
			{ l[NR] = $0 }
			END {
				i = at
				while (i > 1 && l[i - 1] ~ /^[ \t]*#/) i--
				for (k = 1; k <= NR; k++) {
					if (k == i) while ((getline b < blk) > 0) print b
					print l[k]
				}
			}' "$base" >"$out"
	else
		cp -- "$base" "$out"
		if [[ -s $out && -n $(tail -c 1 -- "$out") ]]; then printf '\n' >>"$out"; fi
		cat -- "$STAGE/block" >>"$out"
	fi
}

# warn_hidden_hosts: per-registry directories in the hosts directory hide _default for
# their registry (containerd uses the first directory that exists and merges nothing).
warn_hidden_hosts() {
	local d name
	for d in "$(R "$HOSTS_DIR")"/*/; do
		[[ -d $d ]] || continue
		name=$(basename -- "$d")
		[[ $name == _default ]] && continue
		warn "$HOSTS_DIR/$name/ exists, so containerd reads it instead of _default for registry '$name' (${name%_}): pulls from it bypass cove-node. To route them through cove, add the [host.\"http://$ADDR\"] table of $HOSTS_TOML to $HOSTS_DIR/$name/hosts.toml before its other [host] tables."
	done
	local docker
	docker=$(R /etc/docker/certs.d)
	if [[ -d $docker ]] && [[ -n $(ls -A -- "$docker") ]]; then
		warn "/etc/docker/certs.d has entries; CRI reads only $HOSTS_DIR once config_path is set: move what it needs there"
	fi
}

verify_with_containerd() {
	[[ -n $CTD_BIN ]] || return 0
	local recs=$STAGE/after.recs m got
	if ! m=$(ctd_dump "$recs"); then
		die "containerd ($CTD_BIN) cannot load the new configuration: $m"
	fi
	got=$(rec_get "$recs" "$CRI_V3.registry.config_path" || rec_get "$recs" "$CRI_V2.registry.config_path" || true)
	if [[ $got != "$(R "$HOSTS_DIR")" ]]; then
		die "containerd ($CTD_BIN) reads CRI's registry config_path as '$got', not $(R "$HOSTS_DIR"): an import loaded after the drop-in may override it"
	fi
	if [[ $MODE == content ]]; then
		got=$(rec_get "$recs" proxy_plugins.cove.address || true)
		if [[ $got != "$(R "$CONTENT_SOCKET")" ]]; then
			die "containerd ($CTD_BIN) reads [proxy_plugins.cove] address as '$got', not $(R "$CONTENT_SOCKET"): an import loaded after the drop-in may override it"
		fi
		if ! rec_elems "$recs" disabled_plugins | grep -qxF io.containerd.content.v1.content; then
			die "containerd ($CTD_BIN) does not read io.containerd.content.v1.content in disabled_plugins from the new configuration"
		fi
		say "checked: containerd ${CTD_VERSION:-} loads $CTD_CONFIG with CRI's registry config_path = $(R "$HOSTS_DIR") and the content hook on $(R "$CONTENT_SOCKET")"
		return 0
	fi
	say "checked: containerd ${CTD_VERSION:-} loads $CTD_CONFIG with CRI's registry config_path = $(R "$HOSTS_DIR")"
}

install_main() {
	STAGE=$(mktemp -d)
	find_containerd
	check_containerd_version
	if ((!NO_RESTART)) && ! command -v systemctl >/dev/null; then die "systemctl not found (use --no-restart to install files only)"; fi

	# Read and check everything before changing anything.
	local cfg recs=$STAGE/root.recs version=3 m
	cfg=$(R "$CTD_CONFIG")
	if [[ -L $cfg ]]; then die "$cfg is a symbolic link: pass the file it points to with --containerd-config"; fi
	if [[ -f $cfg ]]; then
		if ! m=$(toml_scan "$cfg" "$recs"); then die "$cfg is not valid TOML ($m): containerd cannot load it; fix it first"; fi
		if [[ -n $CTD_BIN ]] && ! m=$(ctd_dump "$STAGE/before.recs"); then
			die "containerd ($CTD_BIN) cannot load $cfg as it is: $m"
		fi
		version=$(rec_get "$recs" version) || die "$cfg has no version key, so containerd reads it as version 1, which drop-ins cannot extend: migrate it first (containerd config migrate > new.toml, review, replace)"
		case $version in
		2 | 3 | 4) ;;
		*) die "$cfg has version = $version: this script knows versions 2, 3 and 4" ;;
		esac
		check_cri_registry
		stage_root_config "$STAGE/config.toml" "$recs"
	else
		printf '%s\n' \
			"# containerd configuration created by cove install/node.sh (there was none): only the" \
			"# cove-node drop-in, every other setting is containerd's default. --uninstall deletes it." \
			"version = 3" \
			"imports = [\"$(R "$DROPIN")\"]" >"$STAGE/config.toml"
		recs=
	fi
	if [[ $MODE == content ]]; then install_content_hook "$version" "$recs"; fi
	dropin_file "$version" >"$STAGE/dropin.toml"
	if ! m=$(toml_scan "$STAGE/dropin.toml" "$STAGE/dropin.recs"); then die "the drop-in this script made is not valid TOML ($m): a bug, please report it"; fi
	stage_hosts "$STAGE/hosts.toml"
	if [[ -n $CACHE_CA ]]; then stage_cache_ca "$STAGE/cache-ca.pem"; fi
	unit_file >"$STAGE/unit"
	if [[ $MODE == content ]]; then socket_unit_file >"$STAGE/socket"; fi
	warn_hidden_hosts

	# Apply: from here on a failure rolls everything back.
	CHANGING=1
	make_dirs "$BACKUP_DIR"
	# Backups can hold registry credentials (CRI's registry.configs auth).
	chmod 0700 -- "$(R "$BACKUP_DIR")"
	put_file binary "$BIN_PATH" "$BINARY" 0755
	if [[ $MODE == content ]]; then
		put_file socket "$SOCKET_UNIT_PATH" "$STAGE/socket" 0644
	else
		uninstall_socket_unit
	fi
	if [[ -n $CACHE_CA ]]; then
		put_file cacheca "$CACHE_CA_PATH" "$STAGE/cache-ca.pem" 0644
	else
		take_out cacheca "$CACHE_CA_PATH" "no --cache-ca"
	fi
	put_file unit "$UNIT_PATH" "$STAGE/unit" 0644
	put_file hosts "$HOSTS_TOML" "$STAGE/hosts.toml" 0644
	put_file dropin "$DROPIN" "$STAGE/dropin.toml" 0644
	put_file rootconfig "$CTD_CONFIG" "$STAGE/config.toml" 0644
	write_hashes
	verify_with_containerd
	services_install
	CHANGING=0
	if ((${#RUN_PATHS[@]} == 0)); then
		say "nothing to change: cove-node is installed as configured"
	else
		if [[ $MODE == content ]]; then
			say "installed cove-node (content-hook mode) as containerd's mirror http://$ADDR and its content store and differ on $(R "$CONTENT_SOCKET") ($CTD_ROOT/io.containerd.content.v1.content); backups in $BACKUP_DIR; undo with: $PROG --uninstall${ROOT:+ --root-dir $ROOT_DIR --no-restart}"
		else
			say "installed cove-node (mirror-only mode) as containerd's mirror http://$ADDR; backups in $BACKUP_DIR; undo with: $PROG --uninstall${ROOT:+ --root-dir $ROOT_DIR --no-restart}"
		fi
	fi
	say "check: crictl pull IMAGE; curl -s http://$ADDR/metrics | grep cove_node_requests_total (ctr reads hosts.toml only with: ctr image pull --hosts-dir $(R "$HOSTS_DIR") IMAGE)"
}

services_install() {
	if ((NO_RESTART)); then
		if [[ -n $ROOT ]]; then
			say "--no-restart: no service touched (--root-dir $ROOT_DIR is not this machine's root)"
		else
			local sock=
			if [[ $MODE == content ]]; then sock=" && systemctl enable --now $SOCKET_UNIT_NAME"; fi
			if [[ $MODE == mirror ]] && changed socket; then sock=" && systemctl disable --now $SOCKET_UNIT_NAME"; fi
			say "--no-restart: no service touched. To start: systemctl daemon-reload$sock && systemctl enable --now $UNIT_NAME$(changed rootconfig || changed dropin && printf ' && systemctl restart containerd')"
		fi
		return 0
	fi
	local was_active=0 socket_active=0
	if systemctl is-active --quiet "$UNIT_NAME"; then was_active=1; fi
	if systemctl is-active --quiet "$SOCKET_UNIT_NAME"; then socket_active=1; fi
	if [[ $MODE == mirror ]] && changed socket; then
		# The content hook off: the socket unit goes (its file is already gone).
		systemctl disable --now "$SOCKET_UNIT_NAME" || warn "systemctl disable --now $SOCKET_UNIT_NAME failed"
	fi
	systemctl daemon-reload || die "systemctl daemon-reload failed"
	if [[ $MODE == content ]]; then
		# The socket before the service: cove-node takes it over from systemd.
		systemctl enable --now "$SOCKET_UNIT_NAME" || die "systemctl enable --now $SOCKET_UNIT_NAME failed"
		if ((socket_active)) && changed socket; then
			systemctl restart "$SOCKET_UNIT_NAME" || die "systemctl restart $SOCKET_UNIT_NAME failed"
			say "restarted $SOCKET_UNIT_NAME"
		fi
	fi
	systemctl enable --now "$UNIT_NAME" || die "systemctl enable --now $UNIT_NAME failed"
	if ((was_active)) && { changed unit || changed binary || changed cacheca; }; then
		systemctl restart "$UNIT_NAME" || die "systemctl restart $UNIT_NAME failed"
		say "restarted $UNIT_NAME"
	fi
	if changed rootconfig || changed dropin; then
		if ! systemctl restart containerd; then
			printf '%s: error: containerd did not start with the new configuration (journalctl -u containerd)\n' "$PROG" >&2
			if ((!was_active)); then systemctl disable --now "$UNIT_NAME" || true; fi
			if ((!socket_active)) && [[ $MODE == content ]]; then systemctl disable --now "$SOCKET_UNIT_NAME" || true; fi
			rollback
			printf '%s: rolled back: the files are as they were before this run; restarting containerd on them\n' "$PROG" >&2
			systemctl daemon-reload || true
			systemctl restart containerd || warn "containerd did not start on its old configuration either: systemctl status containerd"
			exit 1
		fi
		say "restarted containerd"
	else
		say "containerd's configuration is unchanged: containerd not restarted"
	fi
}

# ---------------------------------------------------------------------------------------
# Uninstall.

uninstall_main() {
	STAGE=$(mktemp -d)
	local m kind role p hp b want cur entries=() restart_ctd=0 left=0 i
	m=$(manifest)
	if [[ ! -f $m ]]; then
		say "nothing to uninstall: no $BACKUP_DIR/manifest${ROOT:+ under $ROOT_DIR}"
		return 0
	fi
	while IFS=$'\t' read -r kind role p; do
		case $kind in dir | new | mod) ;; *) die "$m: unreadable line '$kind $role $p'" ;; esac
		if [[ $p != /* ]]; then die "$m: unreadable line '$kind $role $p'"; fi
		entries+=("$kind"$'\t'"$role"$'\t'"$p")
	done <"$m"
	UNINSTALLING=1
	local socket_unit=''
	if grep -qF -- $'\t'"socket"$'\t' "$m"; then socket_unit=$SOCKET_UNIT_NAME; fi
	if ((!NO_RESTART)); then
		systemctl disable --now "$UNIT_NAME" || warn "systemctl disable --now $UNIT_NAME failed"
		if [[ -n $socket_unit ]]; then
			systemctl disable --now "$SOCKET_UNIT_NAME" || warn "systemctl disable --now $SOCKET_UNIT_NAME failed"
		fi
	fi
	for ((i = ${#entries[@]} - 1; i >= 0; i--)); do
		IFS=$'\t' read -r kind role p <<<"${entries[$i]}"
		[[ $kind == dir ]] && continue
		hp=$(R "$p")
		b=$(R "$BACKUP_DIR/files$p")
		if [[ $role == rootconfig || $role == dropin ]]; then restart_ctd=1; fi
		want=$(awk -F'\t' -v p="$p" '$2 == p { print $1 }' "$(hashes)" 2>/dev/null || true)
		cur=
		if [[ -f $hp ]]; then cur=$(file_hash "$hp"); fi
		if [[ -n $cur && $cur != "$want" && ($role == rootconfig || $role == hosts) ]] &&
			! { [[ $kind == mod ]] && cmp -s -- "$b" "$hp"; }; then
			# Edited since the install: take out only what the install added.
			if [[ $role == hosts ]]; then
				strip_block "$hp" >"$STAGE/undo"
			else
				DROPIN=$(awk -F'\t' '$2 == "dropin" { print $3; exit }' "$m")
				unstage_root_config "$hp" "$STAGE/undo"
			fi
			if [[ $kind == new && ! -s $STAGE/undo ]]; then
				rm -f -- "$hp"
				say "removed: $p"
			elif ! cmp -s -- "$STAGE/undo" "$hp"; then
				cat -- "$STAGE/undo" >"$hp"
				warn "$p changed since the install: kept those changes and removed only what the install added; check it"
			fi
			continue
		fi
		if [[ $kind == new ]]; then
			if [[ -e $hp ]]; then
				rm -f -- "$hp"
				say "removed: $p"
			fi
		elif [[ -f $b ]]; then
			if ! { [[ -f $hp ]] && cmp -s -- "$b" "$hp"; }; then
				cp -p -- "$b" "$hp"
				say "restored: $p"
			else
				touch -r "$b" -- "$hp"
			fi
		else
			warn "no backup of $p in $BACKUP_DIR/files: left as it is"
			left=1
		fi
	done
	rm -rf -- "$(R "$BACKUP_DIR")"
	for ((i = ${#entries[@]} - 1; i >= 0; i--)); do
		IFS=$'\t' read -r kind role p <<<"${entries[$i]}"
		[[ $kind == dir ]] || continue
		hp=$(R "$p")
		[[ -d $hp ]] || continue
		if rmdir -- "$hp" 2>/dev/null; then
			say "removed directory: $p"
		else
			say "kept directory $p: not empty"
		fi
	done
	if ((!NO_RESTART)); then
		systemctl daemon-reload || warn "systemctl daemon-reload failed"
		if ((restart_ctd)); then
			systemctl restart containerd || die "systemctl restart containerd failed (journalctl -u containerd)"
			say "restarted containerd"
		fi
	else
		if [[ -n $ROOT ]]; then
			say "--no-restart: no service touched (--root-dir $ROOT_DIR is not this machine's root)"
		else
			say "--no-restart: no service touched. To finish: systemctl disable --now $UNIT_NAME${socket_unit:+ $socket_unit} && systemctl daemon-reload$( ((restart_ctd)) && printf ' && systemctl restart containerd')"
		fi
	fi
	if ((left)); then die "uninstall incomplete: see the warnings above"; fi
	say "uninstalled cove-node"
}

# ---------------------------------------------------------------------------------------

main() {
	parse_args "$@"
	validate_args
	if ((UNINSTALL)); then
		uninstall_main
	else
		install_main
	fi
}

main "$@"
