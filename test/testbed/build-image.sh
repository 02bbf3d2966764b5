#!/usr/bin/env bash
# build-image.sh: build (or reuse) the cached Xen testbed image.
#
#   test/testbed/build-image.sh          print the image directory, building it if needed
#   test/testbed/build-image.sh --force  rebuild even if the cache has it
#
# The image is a Debian bookworm dom0 (Xen 4.17 hypervisor + utils, kernel 6.1, systemd) as an
# ext4 file made with `mkfs.ext4 -d` (no loop mount), plus the boot files QEMU needs. It lives in
# $XENBLKD_TESTBED_CACHE/<recipe hash>/ (default /var/cache/xenblkd-testbed): a rebuild happens
# only when the recipe (this script, configure-rootfs.sh, image/*) changes. The build runs in a
# temporary directory renamed into place at the end, so an interrupted build never leaves a
# half-made cache entry. xenblkd itself is NOT in the image: run.sh brings it on the control disk.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

force=0
[[ ${1:-} == --force ]] && force=1

ROOTFS_SIZE=4G
BUILD_DEADLINE_S=1800 # debootstrap from the network took ~2 min; a stuck mirror must not hang CI
PACKAGES=(
	xen-system-amd64 xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils
	linux-image-amd64 initramfs-tools systemd-sysv udev kmod
	iproute2 procps util-linux e2fsprogs psmisc
	busybox-static # the PV guest's whole userland (image/domu-init)
	# upstream libvirt's libxl driver, for the libvirt group (tests.d/51-libvirt.sh); libvirtd is
	# started by hand there (libvirt-daemon-system's units are not needed)
	libvirt-daemon libvirt-daemon-driver-xen libvirt-clients
)

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap mkfs.ext4 cpio gzip sha256sum; do
	command -v "$tool" >/dev/null || die "$tool missing: run scripts/setup.sh testbed"
done

dest=$(image_dir)
if [[ $force == 0 && -f $dest/complete ]]; then
	log "reusing cached image $dest"
	printf '%s\n' "$dest"
	exit 0
fi

mkdir -p "$TESTBED_CACHE"
# One builder at a time; a second one waits, then finds the finished image.
exec 9>"$TESTBED_CACHE/.lock"
flock -w "$BUILD_DEADLINE_S" 9 || die "another build holds $TESTBED_CACHE/.lock"
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
# We hold the lock, so any other build directory is the leftover of a killed build.
for stale in "$TESTBED_CACHE"/.build-*; do
	[[ -d $stale ]] && { log "removing $stale (an interrupted build)"; remove_build_dir "$stale"; }
done
work=$(mktemp -d "$TESTBED_CACHE/.build-XXXXXX")
trap 'remove_build_dir "$work"' EXIT

t0=$EPOCHREALTIME
mirror=$(debian_mirror)
[[ -n $mirror ]] || die "no Debian mirror found in the host's apt configuration"
rootfs=$work/rootfs
log "debootstrap bookworm from $mirror into $rootfs"
# --foreground: Ctrl-C reaches debootstrap too, and the exit trap runs right away.
timeout --foreground -k 30 "$BUILD_DEADLINE_S" debootstrap --variant=minbase \
	--include="$(IFS=,; echo "${PACKAGES[*]}")" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
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
	echo "recipe_hash=$(recipe_hash)"
	echo "built=$(date -u +%FT%TZ)"
	awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN{printf "timings_s: debootstrap=%.0f configure=%.0f mkimage=%.0f total=%.0f\n", b-a, c-b, d-c, d-a}'
	chroot "$rootfs" dpkg-query -W -f='${Package} ${Version}\n' \
		xen-hypervisor-4.17-amd64 xen-utils-4.17 linux-image-amd64 systemd busybox-static
} >"$work/out/build-info.txt"
touch "$work/out/complete"

rm -rf --one-file-system "$dest" # a --force rebuild, or an entry without `complete`
mv "$work/out" "$dest"
log "built $dest: $(grep timings_s "$dest/build-info.txt")"
printf '%s\n' "$dest"
