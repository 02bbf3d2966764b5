#!/usr/bin/env bash
# trixie-root.sh: build (or reuse) a cached Debian 13 "trixie" root file system on the host, the
# peer the tests use for the stack a new host runs today: Xen 4.20's C xenstored and oxenstored
# (the XenStore contract suite runs them under the preload shim), systemd 257 (systemd-analyze
# verify/security on the shipped units, and PID 1 of test/systemd's sandbox) and Debian 13's
# lintian (on the .deb, beside the host's).
#
#   scripts/trixie-root.sh           print the root's directory, building it if needed
#   scripts/trixie-root.sh --force   rebuild even if the cache has it
#
# It lives in $XENBLKD_TRIXIE_ROOT (default /var/cache/xenblkd-trixie-root). A rebuild happens only
# when this script changes (its hash is recorded in the root). The build runs in a temporary
# directory renamed into place at the end, so an interrupted build never leaves a half-made root.
# Nothing is ever started inside it here: the tests run its programs with the host's /proc and a
# private /dev, /tmp and /run of their own.
set -euo pipefail

die() { echo "trixie-root.sh: $*" >&2; exit 1; }
log() { echo "trixie-root.sh: $*" >&2; }

force=0
[[ ${1:-} == --force ]] && force=1

dest=${XENBLKD_TRIXIE_ROOT:-/var/cache/xenblkd-trixie-root}
BUILD_DEADLINE_S=1800 # a stuck mirror must not hang CI
PACKAGES=(
	# Xen 4.20's xenstored (C) and oxenstored, xenstore-* clients, the stock block script
	xen-utils-4.20 xen-utils-common xenstore-utils
	# systemd 257: systemd-analyze, and PID 1 of test/systemd's sandbox
	systemd systemd-sysv dbus util-linux mount
	# the .deb's own test: install/upgrade/purge with dpkg/apt
	apt
)
# Installed after debootstrap: lintian's perl dependencies stop debootstrap on a virtual package
# (perl-openssl-abi-3) it cannot resolve itself; apt can.
LATE_PACKAGES=(lintian)

recipe=$(sha256sum "$0" | cut -c1-16)
if [[ $force == 0 && -f $dest/.xenblkd-complete && $(cat "$dest/.xenblkd-complete") == "$recipe" ]]; then
	printf '%s\n' "$dest"
	exit 0
fi
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap missing: run scripts/setup.sh"

mkdir -p "$(dirname "$dest")"
# One builder at a time; a second one waits, then finds the finished root.
exec 9>"$dest.lock"
flock -w "$BUILD_DEADLINE_S" 9 || die "another build holds $dest.lock"
if [[ $force == 0 && -f $dest/.xenblkd-complete && $(cat "$dest/.xenblkd-complete") == "$recipe" ]]; then
	printf '%s\n' "$dest"
	exit 0
fi

# remove_build_dir DIR unmounts whatever debootstrap or chroot left mounted inside DIR, then removes
# it without crossing into another file system.
remove_build_dir() {
	local m
	for m in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do
		umount -l "$m" || true
	done
	rm -rf --one-file-system "$1"
}
for stale in "$dest".build-*; do
	[[ -d $stale ]] && { log "removing $stale (an interrupted build)"; remove_build_dir "$stale"; }
done
work=$(mktemp -d "$dest.build-XXXXXX")
trap 'remove_build_dir "$work"' EXIT

# The mirror is the host's (Debian 13's packages come from the same mirror as Debian 12's).
mirror=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
	mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
	mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
fi
[[ -n $mirror ]] || die "no Debian mirror found in the host's apt configuration"

t0=$EPOCHREALTIME
rootfs=$work/root
log "debootstrap trixie from $mirror into $rootfs"
timeout --foreground -k 30 "$BUILD_DEADLINE_S" debootstrap --variant=minbase \
	--include="$(IFS=,; echo "${PACKAGES[*]}")" trixie "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
	{ tail -30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
t1=$EPOCHREALTIME

log "installing ${LATE_PACKAGES[*]} in the root"
# No service starts inside the root while packages install.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
mount -t proc proc "$rootfs/proc"
timeout --foreground -k 30 "$BUILD_DEADLINE_S" chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive \
	apt-get install -y -qq --no-install-recommends "${LATE_PACKAGES[@]}" >"$work/late.log" 2>&1 ||
	{ tail -30 "$work/late.log" >&2; die "installing ${LATE_PACKAGES[*]} failed (log above)"; }
chroot "$rootfs" apt-get clean
umount "$rootfs/proc"
t2=$EPOCHREALTIME

{
	echo "built=$(date -u +%FT%TZ)"
	awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN{printf "timings_s: debootstrap=%.0f late=%.0f total=%.0f\n", b-a, c-b, c-a}'
	chroot "$rootfs" dpkg-query -W -f='${Package} ${Version}\n' xen-utils-4.20 systemd lintian
} >"$rootfs/.xenblkd-build-info"
printf '%s\n' "$recipe" >"$rootfs/.xenblkd-complete"

rm -rf --one-file-system "$dest"
mv "$rootfs" "$dest"
log "built $dest: $(grep timings_s "$dest/.xenblkd-build-info")"
printf '%s\n' "$dest"
