# 30-discard.sh: a guest's TRIM punches holes in its sparse image file (group `discard`).
#
# The image gets an ext4 file system here in dom0 (mkfs without discard, so it stays sparse). The
# same guest then boots twice through xenblkd, from a test initramfs built below at test time from
# the cached guest's (/root/domu/initrd.gz) plus dom0's ext4 modules, its phase chosen on the
# kernel command line:
#   write: mount, write a 48 MiB file, sync, unmount, power off;
#   trim:  mount, delete the file, fstrim (busybox), unmount, power off.
# Checked in dom0: the image's allocated size grows by the file after `write` and drops after
# `trim` (stat's block count); e2fsck -fn of the image passes after the cycle (busybox has no
# e2fsck, so dom0 checks the guest's file system once the guest is gone); the guest saw 512-byte
# logical sectors and a discard-capable disk; xenblkd logged the loop device's I/O mode.
# Two short boots rather than one guest that waits on dom0: no handshake to get wrong.

DISCARD_IMG=$WORK/xenblkd-discard.img
DISCARD_INITRD=$WORK/discard-initrd.gz
DISCARD_MIB=48

# discard_initrd: the guest initramfs for this test, in $DISCARD_INITRD.
discard_initrd() {
	local dir=$WORK/discard-initrd ko b
	rm -rf "$dir" && mkdir -p "$dir" || return 1
	(cd "$dir" && gzip -dc /root/domu/initrd.gz | cpio -idm --quiet) || return 1
	: >"$dir/mods/order"
	# modprobe prints the insmod lines of ext4 and its dependencies, in load order
	# ("builtin ..." for what the kernel has built in). crc32c_generic too: ext4 asks the crypto
	# API for crc32c at mount time (a soft dependency modprobe does not list), and Linux 6.12 has
	# it as a module.
	for ko in $(modprobe --show-depends -a ext4 crc32c_generic | awk '$1 == "insmod" {print $2}'); do
		b=$(basename "$ko")
		case $ko in
		*.ko) cp "$ko" "$dir/mods/$b" ;;
		*.ko.xz) b=${b%.xz}; xz -dc "$ko" >"$dir/mods/$b" ;;
		*.ko.zst) b=${b%.zst}; zstd -qdc "$ko" >"$dir/mods/$b" ;;
		*) echo "discard: cannot unpack module $ko"; return 1 ;;
		esac
		grep -qxF "$b" "$dir/mods/order" || echo "$b" >>"$dir/mods/order"
	done
	echo xen-blkfront.ko >>"$dir/mods/order"
	cat >"$dir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod "/mods/$m" || echo "DOMU-DISCARD insmod $m failed"; done
end=$(($(cut -d. -f1 /proc/uptime) + 60))
while [ ! -e /sys/block/xvda ] && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.1; done
phase=$(sed -n 's/.*xbd.phase=\([a-z]*\).*/\1/p' /proc/cmdline)
q=/sys/block/xvda/queue
echo "DOMU-DISCARD phase=$phase lbs=$(cat $q/logical_block_size) discard_max=$(cat $q/discard_max_bytes)"
mkdir -p /mnt
if mount -t ext4 /dev/xvda /mnt; then
	case $phase in
	write) dd if=/dev/zero of=/mnt/fill bs=1M count=$(sed -n 's/.*xbd.mib=\([0-9]*\).*/\1/p' /proc/cmdline) 2>/dev/null; sync
		echo "DOMU-DISCARD wrote $(du -k /mnt/fill | cut -f1) KiB" ;;
	trim) rm -f /mnt/fill; sync
		echo "DOMU-DISCARD fstrim: $(fstrim -v /mnt 2>&1)" ;;
	esac
	umount /mnt && echo "DOMU-DISCARD-DONE ok"
else
	echo "DOMU-DISCARD-DONE mount failed"
fi
poweroff -f
EOF
	chmod 755 "$dir/init"
	(cd "$dir" && find . | cpio -o -H newc --quiet | gzip -1) >"$DISCARD_INITRD"
}

# discard_cfg NAME PHASE: a PV guest with the discard image as xvda, through xenblkd.
discard_cfg() {
	cat >"$WORK/$1.cfg" <<EOF
name = "$1"
type = "pv"
kernel = "/root/domu/vmlinux"
ramdisk = "$DISCARD_INITRD"
extra = "console=hvc0 quiet xbd.phase=$2 xbd.mib=$DISCARD_MIB"
memory = 128
vcpus = 1
disk = [ 'format=raw, vdev=xvda, access=rw, script=xenblkd, target=$DISCARD_IMG' ]
on_poweroff = "destroy"
on_crash = "destroy"
EOF
}

# allocated_kib FILE: the file's allocated size in KiB (st_blocks are 512 bytes).
allocated_kib() { echo $(($(stat -c %b "$1") / 2)); }

# discard_boot NAME: boot the guest, wait for its DOMU-DISCARD-DONE line and for it to go.
discard_boot() {
	local name=$1 log=$CONSOLE_DIR/guest-$1.log deadline
	create "$name"
	((CREATE_RC == 0)) || { echo "xl create: $(xl_errors "$name")"; return 1; }
	deadline=$(($(now) + 150))
	while ! grep -aq DOMU-DISCARD-DONE "$log" 2>/dev/null && (($(now) < deadline)); do sleep 1; done
	grep -a DOMU- "$log" | sed "s/^/   [$name] /"
	wait_gone "$name"
	grep -aq 'DOMU-DISCARD-DONE ok' "$log"
}

# discard_grew BEFORE AFTER: the image grew by most of the file the guest wrote.
discard_grew() { echo "allocated ${1} KiB -> ${2} KiB"; (($2 - $1 >= DISCARD_MIB * 1024 * 3 / 4)); }
# discard_shrank BEFORE AFTER: the trim gave most of it back.
discard_shrank() { echo "allocated ${1} KiB -> ${2} KiB"; (($1 - $2 >= DISCARD_MIB * 1024 * 3 / 4)); }

test_discard() {
	local name=t30-xenblkd-discard before written trimmed log
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$name: guest TRIM shrinks its image" || return
	say "$name: a guest writes ${DISCARD_MIB} MiB to ext4 on a sparse image, deletes it and runs fstrim"
	if ! discard_initrd; then
		fail "$name: test initramfs (busybox + ext4 modules)" "could not build it"
		return
	fi
	rm -f "$DISCARD_IMG"
	truncate -s 256M "$DISCARD_IMG"
	mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0 "$DISCARD_IMG"
	before=$(allocated_kib "$DISCARD_IMG")

	discard_cfg "$name-write" write
	check "$name: guest wrote ${DISCARD_MIB} MiB" "guest failed" discard_boot "$name-write"
	written=$(allocated_kib "$DISCARD_IMG")
	check "$name: image grew by the file" "it did not" discard_grew "$before" "$written"

	discard_cfg "$name-trim" trim
	check "$name: guest deleted it and trimmed" "guest failed" discard_boot "$name-trim"
	trimmed=$(allocated_kib "$DISCARD_IMG")
	check "$name: image's allocated size dropped after the trim" "no hole punched" \
		discard_shrank "$written" "$trimmed"
	check "$name: e2fsck -fn of the guest's file system passes after the cycle" "e2fsck failed" \
		e2fsck -fn "$DISCARD_IMG"

	log=$CONSOLE_DIR/guest-$name-trim.log
	check "$name: the guest saw 512-byte sectors" "$(grep -a 'DOMU-DISCARD phase' "$log" | head -1)" \
		grep -aq 'DOMU-DISCARD phase=trim lbs=512 ' "$log"
	check "$name: the guest's disk offers discard" "discard_max_bytes is 0" \
		grep -aqE 'DOMU-DISCARD phase=trim .*discard_max=[1-9]' "$log"
	check "$name: xenblkd logged the loop device's I/O mode" "no 'loop I/O mode' line for the image" \
		bash -c "journalctl -b -u xenblkd --no-pager | grep -F 'loop I/O mode' | grep -F '$DISCARD_IMG'"
	check "$name: teardown leaves no loop device and no backend" "leftovers" no_leftovers
}

group discard test_discard
