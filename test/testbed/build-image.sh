#!/usr/bin/env bash
# build-image.sh: build (or reuse) the cached Xen testbed image.
#
#   test/testbed/build-image.sh          print the image directory, building it if needed
#   test/testbed/build-image.sh --force  rebuild even if the cache has it
#
# XENBLKD_TESTBED_RELEASE (default bookworm) picks the Debian release, releases/<name>.conf:
# bookworm (Xen 4.17, Linux 6.1, systemd 252) or trixie (Xen 4.20, Linux 6.12, systemd 257). The
# image is that release's dom0 (the Xen hypervisor + utils Debian pairs with it, the kernel,
# systemd, libvirt) as an ext4 file made with `mkfs.ext4 -d` (no loop mount), plus the boot files
# QEMU needs. It lives in $XENBLKD_TESTBED_CACHE/<release>-<recipe hash>/ (default
# /var/cache/xenblkd-testbed): a rebuild happens only when the recipe (this script,
# configure-rootfs.sh, image/*, the release's conf) changes. The build runs in a temporary
# directory renamed into place at the end, so an interrupted build never leaves a half-made cache
# entry; builds of different releases run side by side. xenblkd itself is NOT in the image:
# run.sh brings it on the control disk.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

force=0
[[ ${1:-} == --force ]] && force=1

ROOTFS_SIZE=4G
BUILD_DEADLINE_S=1800 # debootstrap from the network took ~2 min; a stuck mirror must not hang CI
check_release
# shellcheck source=/dev/null
. "$TESTBED_DIR/releases/$TESTBED_RELEASE.conf"
PACKAGES=(
	# xen-system-amd64 depends on the release's hypervisor and utils (xen-hypervisor-4.x-amd64,
	# xen-utils-4.x): no Xen version is written in here
	xen-system-amd64 xenstore-utils
	linux-image-amd64 initramfs-tools systemd-sysv udev kmod
	iproute2 procps util-linux e2fsprogs psmisc
	busybox-static # the PV guest's whole userland (image/domu-init)
	# upstream libvirt's libxl driver, for the libvirt group (tests.d/51-libvirt.sh); libvirtd is
	# started by hand there (libvirt-daemon-system's units are not needed)
	libvirt-daemon libvirt-daemon-driver-xen libvirt-clients
	"${EXTRA_PACKAGES[@]}" # the release's own additions (releases/<name>.conf)
)

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap mkfs.ext4 cpio gzip xz zstd sha256sum; do
	command -v "$tool" >/dev/null || die "$tool missing: run scripts/setup.sh testbed"
done

dest=$(image_dir)
if [[ $force == 0 && -f $dest/complete ]]; then
	log "reusing cached image $dest"
	printf '%s\n' "$dest"
	exit 0
fi

mkdir -p "$TESTBED_CACHE"
# One builder per release at a time; a second one waits, then finds the finished image.
exec 9>"$TESTBED_CACHE/.lock-$TESTBED_RELEASE"
flock -w "$BUILD_DEADLINE_S" 9 || die "another build holds $TESTBED_CACHE/.lock-$TESTBED_RELEASE"
if [[ $force == 0 && -f $dest/complete ]]; then
	log "reusing cached image $dest (built by a concurrent run)"
	printf '%s\n' "$dest"
	exit 0
fi

# remove_build_dir DIR unmounts whatever debootstrap left mounted inside the chroot, then removes
# DIR without crossing into another file system (a leftover /proc or /dev mount is never walked).
remove_build_dir() {
	local m
	for m in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do
		umount -l "$m" || true
	done
	rm -rf --one-file-system "$1"
}
# We hold the release's lock, so any other build directory of it is the leftover of a killed build.
for stale in "$TESTBED_CACHE"/.build-"$TESTBED_RELEASE"-*; do
	[[ -d $stale ]] && { log "removing $stale (an interrupted build)"; remove_build_dir "$stale"; }
done
work=$(mktemp -d "$TESTBED_CACHE/.build-$TESTBED_RELEASE-XXXXXX")
trap 'remove_build_dir "$work"' EXIT

t0=$EPOCHREALTIME
mirror=$(debian_mirror)
[[ -n $mirror ]] || die "no Debian mirror found in the host's apt configuration"
rootfs=$work/rootfs
log "debootstrap $SUITE from $mirror into $rootfs"
# The release's .debs are kept in $TESTBED_CACHE/debs-<suite>/ (debootstrap checks them against
# the mirror's checksums): a recipe change rebuilds without downloading again.
debs=$TESTBED_CACHE/debs-$SUITE
mkdir -p "$debs"
# --foreground: Ctrl-C reaches debootstrap too, and the exit trap runs right away.
timeout --foreground -k 30 "$BUILD_DEADLINE_S" debootstrap --variant=minbase --cache-dir="$debs" \
	--include="$(IFS=,; echo "${PACKAGES[*]}")" "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
	{ tail -30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
t1=$EPOCHREALTIME

log "configuring the dom0 rootfs"
timeout 600 "$TESTBED_DIR/configure-rootfs.sh" "$rootfs" "$work/out"
t2=$EPOCHREALTIME

log "making the ext4 image ($ROOTFS_SIZE sparse, mkfs.ext4 -d)"
truncate -s "$ROOTFS_SIZE" "$work/out/rootfs.img"
mkfs.ext4 -q -F -L xenblkd-dom0 -d "$rootfs" "$work/out/rootfs.img"
t3=$EPOCHREALTIME

{
	echo "release=$TESTBED_RELEASE"
	echo "recipe_hash=$(recipe_hash)"
	echo "built=$(date -u +%FT%TZ)"
	awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN{printf "timings_s: debootstrap=%.0f configure=%.0f mkimage=%.0f total=%.0f\n", b-a, c-b, d-c, d-a}'
	# Installed packages only (the patterns also match virtual and removed ones).
	chroot "$rootfs" dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' \
		'xen-hypervisor-4*' 'xen-utils-4*' 'linux-image-[0-9]*' systemd libvirt-daemon busybox-static |
		awk '$1 == "ii" {print $2, $3}'
} >"$work/out/build-info.txt"
touch "$work/out/complete"

rm -rf --one-file-system "$dest" # a --force rebuild, or an entry without `complete`
mv "$work/out" "$dest"
log "built $dest: $(grep timings_s "$dest/build-info.txt")"
printf '%s\n' "$dest"
