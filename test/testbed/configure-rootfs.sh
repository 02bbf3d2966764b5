#!/usr/bin/env bash
# configure-rootfs.sh ROOTFS OUT: turn a fresh debootstrap (bookworm or trixie) into the testbed's dom0
# and put the files QEMU boots (xen, vmlinuz, initrd.img) into OUT. Called by build-image.sh;
# part of the recipe hash.
set -euo pipefail
rootfs=${1:?usage: configure-rootfs.sh ROOTFS OUT}
out=${2:?usage: configure-rootfs.sh ROOTFS OUT}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

echo xenblkd-dom0 >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 xenblkd-dom0\n' >"$rootfs/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 0\n' >"$rootfs/etc/fstab"
chroot "$rootfs" passwd -d root >/dev/null

# Every guest console is logged to /var/log/xen/console/guest-<name>.log: the tests read the
# guest's DOMU-* lines there. (Debian's /etc/init.d/xen ignores XENCONSOLED_TRACE.)
mkdir -p "$rootfs/var/log/xen/console"
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >>"$rootfs/etc/default/xen"

# A small dom0 initramfs: only what mounts an ext4 root from virtio-blk. Xen copies the boot
# modules at boot; the default MODULES=most initrd (37 MB) costs boot time for nothing.
mkdir -p "$rootfs/etc/initramfs-tools/conf.d"
printf 'MODULES=list\nCOMPRESS=gzip\n' >"$rootfs/etc/initramfs-tools/conf.d/xenblkd-testbed.conf"
printf 'virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n' >"$rootfs/etc/initramfs-tools/modules"
chroot "$rootfs" update-initramfs -u -k all >/dev/null

# The batch runner: runs run-in-dom0.sh from the control disk (/dev/vdb) after boot, then
# powers off. Root autologin on hvc0 is for interactive debugging (boot.sh --interactive).
install -m 755 "$here/image/xenblkd-testbed-runner" "$rootfs/usr/local/sbin/xenblkd-testbed-runner"
install -m 644 "$here/image/xenblkd-testbed-runner.service" "$rootfs/etc/systemd/system/"
chroot "$rootfs" systemctl enable xenblkd-testbed-runner.service >/dev/null 2>&1
mkdir -p "$rootfs/etc/systemd/system/serial-getty@hvc0.service.d"
printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,38400,9600 %%I $TERM\n' \
	>"$rootfs/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf"
# Keep the boot short (every unit costs seconds under TCG): no apt timers, no network wait, no
# gettys on virtual terminals nobody sees, no ext4 scrub, a journal in RAM only (no flush to
# disk; the root disk is a throw-away snapshot anyway), no domain save/restore at shutdown.
chroot "$rootfs" systemctl mask apt-daily.timer apt-daily-upgrade.timer \
	systemd-networkd-wait-online.service e2scrub_all.timer e2scrub_reap.service fstrim.timer \
	getty-static.service getty@tty1.service systemd-journal-flush.service >/dev/null 2>&1 || true
mkdir -p "$rootfs/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$rootfs/etc/systemd/journald.conf.d/xenblkd-testbed.conf"
chroot "$rootfs" systemctl disable xendomains.service >/dev/null 2>&1 || true

# vmlinux_from_bzimage BZIMAGE OUT: the kernel's uncompressed ELF image, from the payload the
# bzImage's setup header locates (payload_offset at 0x248, payload_length at 0x24c). libxl then
# loads the guest kernel as it is instead of decompressing it at every `xl create`: Debian 12's
# xz payload took ~5 s of dom0's emulated CPU per guest (9.9 -> 4.7 s per xl create).
vmlinux_from_bzimage() {
	local bz=$1 out=$2 sects off len magic
	le32() { od -An -tu4 -j "$1" -N4 "$bz" | tr -d ' '; }
	sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
	((sects == 0)) && sects=4
	off=$(((sects + 1) * 512 + $(le32 $((0x248)))))
	len=$(le32 $((0x24c)))
	magic=$(od -An -tx1 -j "$off" -N4 "$bz" | tr -d ' ')
	# The payload ends with its uncompressed size (4 bytes), which no decompressor wants. dd reads
	# exactly the payload (a head -c would leave its writer a SIGPIPE, a failure under pipefail).
	payload() { dd if="$bz" iflag=skip_bytes,count_bytes skip="$off" count=$((len - 4)) bs=1M status=none; }
	case $magic in
	fd377a58) payload | xz -dc --single-stream ;;
	28b52ffd) payload | zstd -dcq ;;
	1f8b08*) payload | gzip -dc ;;
	*) echo "$bz: payload compression $magic not handled" >&2; return 1 ;;
	esac >"$out" || return 1
	[[ $(od -An -tx1 -N4 "$out" | tr -d ' ') == 7f454c46 ]] || { echo "$bz: no ELF image inside" >&2; return 1; }
}

# The PV guest: the dom0 kernel (uncompressed: vmlinux) + a busybox initramfs (image/domu-init)
# that loads xen-blkfront and prints each disk's signature.
kver=$(ls "$rootfs/lib/modules" | sort -V | tail -1)
domu=$(mktemp -d)
mkdir -p "$domu"/{bin,dev,proc,sys,mods}
cp "$rootfs/bin/busybox" "$domu/bin/busybox"
ko=$(find "$rootfs/lib/modules/$kver" -name 'xen-blkfront.ko*' | head -1)
case "$ko" in
"") echo "xen-blkfront module not found (built in?)" >&2 ;;
*.xz) xz -dc "$ko" >"$domu/mods/xen-blkfront.ko" ;;
*) cp "$ko" "$domu/mods/xen-blkfront.ko" ;;
esac
install -m 755 "$here/image/domu-init" "$domu/init"
mkdir -p "$rootfs/root/domu"
(cd "$domu" && find . | cpio -o -H newc --quiet | gzip -9) >"$rootfs/root/domu/initrd.gz"
vmlinux_from_bzimage "$rootfs/boot/vmlinuz-$kver" "$rootfs/root/domu/vmlinux"
rm -rf "$domu"

# The storage driver domain (tests.d/60-driverdomain.sh): the same kernel, with an initramfs of
# busybox, Debian's xl (for `xl devd`) and xenstore client with their libraries (ldd in the chroot),
# /etc/xen/xl.conf, and xen-blkback, loop and the xen device modules (privcmd for libxl, gntdev,
# evtchn) in modprobe's load order; image/driverdom-init is its /init. No xenstored, no systemd.
# xenblkd and the test's /xbd/init are appended at test time (a second cpio archive), so the base
# is padded to a 4-byte boundary: the kernel looks for an uncompressed archive there.
dd=$(mktemp -d)
mkdir -p "$dd"/{bin,dev,proc,sys,run,tmp,srv,xbd,usr/bin,usr/sbin,lib/modules,etc/xen/scripts,var/log/xen,var/lib/xen}
cp "$rootfs/bin/busybox" "$dd/bin/busybox"
# The Xen tools live in /usr/lib/xen-<version>/ (4.17 on bookworm, 4.20 on trixie): found here,
# not written in.
xenlib=$(cd "$rootfs" && ls -d usr/lib/xen-[0-9]* | sort -V | tail -1)
[[ -x $rootfs/$xenlib/bin/xl ]] || { echo "no xl in $rootfs/usr/lib/xen-*/bin" >&2; exit 1; }
for bin in "/$xenlib/bin/xl" /usr/bin/xenstore; do
	for f in "$bin" $(chroot "$rootfs" ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
		mkdir -p "$dd$(dirname "$f")"
		cp -L "$rootfs$f" "$dd$f"
	done
done
ln -s "../${xenlib#usr/}/bin/xl" "$dd/usr/sbin/xl"
# One binary for every xenstore-* command (it dispatches on argv[0]).
for c in read write exists list ls rm watch chmod; do ln -s xenstore "$dd/usr/bin/xenstore-$c"; done
cp "$rootfs/etc/xen/xl.conf" "$dd/etc/xen/xl.conf"
: >"$dd/lib/modules/load.list"
for ko in $(chroot "$rootfs" modprobe -S "$kver" --show-depends -a xen-blkback loop xen-privcmd xen-gntdev xen-evtchn |
	awk '$1 == "insmod" {print $2}'); do
	b=$(basename "$ko")
	grep -qxF "${b%.xz}" "$dd/lib/modules/load.list" && continue
	case $ko in
	*.xz) b=${b%.xz}; xz -dc "$rootfs$ko" >"$dd/lib/modules/$b" ;;
	*) cp "$rootfs$ko" "$dd/lib/modules/$b" ;;
	esac
	echo "$b" >>"$dd/lib/modules/load.list"
done
install -m 755 "$here/image/driverdom-init" "$dd/init"
mkdir -p "$rootfs/root/driverdom"
(cd "$dd" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$rootfs/root/driverdom/initrd-base.gz"
truncate -s %4 "$rootfs/root/driverdom/initrd-base.gz"
rm -rf "$dd"

# Boot files for QEMU's multiboot loader, which needs the uncompressed (32-bit ELF) xen.
xengz=$(ls "$rootfs"/boot/xen-*.gz | sort -V | tail -1)
gzip -dc "$xengz" >"$out/xen"
cp "$rootfs/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$out/initrd.img"
echo "$kver" >"$out/kernel-version"
