#!/usr/bin/env bash
# setup.sh: install everything xenblkd's tests, benchmarks and demo need on a
# fresh Debian 12 machine, and the cached Debian 13 root (scripts/trixie-root.sh).
# Idempotent: packages already present are not touched (no upgrades as a side
# effect), so a second run costs well under a second.
#
#   scripts/setup.sh            packages for `make test` and `make bench`
#   scripts/setup.sh testbed    also the Xen-under-QEMU testbed (make demo / e2e)
set -euo pipefail

# The host release's Xen tools (the package name carries Xen's version); the
# tests find the version at run time (/usr/lib/xen-X.Y).
. /etc/os-release
case ${VERSION_ID:-} in
12) xen_utils=xen-utils-4.17 ;;
13) xen_utils=xen-utils-4.20 ;;
*) echo "setup.sh: Debian ${VERSION_ID:-?} is not supported (Debian 12 or 13: docs/platforms.md)" >&2; exit 1 ;;
esac
pkgs=(
	# real XenStore peers (C xenstored, oxenstored), the stock block script and
	# its helpers, the headers for the xenstored shim; Debian 13's Xen (4.20) on a
	# Debian 12 host is in the trixie root
	"$xen_utils" xen-utils-common xenstore-utils libxen-dev
	gcc libc6-dev make util-linux e2fsprogs
	# the C hotplug entry: static (libc6-dev's libc.a) and its ASan/UBSan
	# test build (gcc's runtimes; explicit in case gcc comes without them)
	libasan8 libubsan1
	# make install / make deb and their tests (test/install): man page check,
	# lintian on the package
	man-db lintian
	# benchmarks; test/entry counts the entry's syscalls; make bench-io and the
	# loop tests: fio, and file systems to make in image files (ext4 from
	# e2fsprogs above)
	hyperfine strace fio xfsprogs btrfs-progs
	# promtool: the metrics tests lint the real /metrics output with it;
	# curl: the operator tests scrape the daemon's metrics socket with it
	prometheus curl
	# make test-stress: the CPU and I/O load beside the stressed runs
	stress-ng
	# cluster mode's two-host tests (internal/sanlock, cmd/xenblkd): the real
	# sanlock daemon, run with its watchdog off; never wdmd or softdog
	sanlock
)
if [[ ${1:-} == testbed || ${1:-} == all ]]; then
	pkgs+=(qemu-system-x86 qemu-utils cpio gzip socat perl python3 xz-utils zstd)
fi
# debootstrap: the testbed's image and the trixie root
pkgs+=(debootstrap)

# The cached Debian 13 root (Xen 4.20's xenstored and oxenstored, systemd 257, lintian 2.122) the
# tests use beside the host's Debian 12 stack; built once (~2 min), then reused at no cost.
trixie_root() {
	if [[ $(id -u) != 0 ]]; then
		[[ -f ${XENBLKD_TRIXIE_ROOT:-/var/cache/xenblkd-trixie-root}/.xenblkd-complete ]] ||
			echo "setup.sh: need root to build the Debian 13 root (scripts/trixie-root.sh)" >&2
		return 0
	fi
	"$(dirname "$0")/trixie-root.sh" >/dev/null
}

missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$p")
	fi
done
if ((${#missing[@]} == 0)); then
	trixie_root
	exit 0
fi
if [[ $(id -u) != 0 ]]; then
	echo "setup.sh: need root to install: ${missing[*]}" >&2
	exit 1
fi
echo "setup.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
# Debian's prometheus package starts a Prometheus server (on every interface)
# from its postinst; we only want its promtool. Where nothing stops services
# from starting at install (containers ship a policy-rc.d), forbid it for the
# duration of this install.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
	printf '#!/bin/sh\n# scripts/setup.sh: no service starts during its install\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
# --no-install-recommends keeps the hypervisor, grub-xen and qemu-system-xen
# out (and prometheus-node-exporter).
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2
# The tests run their own sanlock daemons with the watchdog off; the
# package's units would start wdmd (which opens /dev/watchdog, loading
# softdog if need be) and sanlock at the next boot: keep them off. A
# production host enables them itself (docs/cluster.md).
if [[ " ${missing[*]} " == *" sanlock "* ]]; then
	systemctl disable wdmd.service sanlock.service >/dev/null 2>&1 || true
fi
trixie_root
