#!/bin/sh
# Runs as PID 1 of fresh pid/mount/uts/ipc/net/cgroup namespaces (started by
# systemd.go).
# Builds a throw-away root: overlay(lower=$SBX_LOWER read-only: / or another
# root file system such as the cached Debian 13 one, upper=tmpfs), private
# /dev (mknod'd nodes only: no devtmpfs, so no udev side effects), read-only
# /sys and /proc/sys, private /tmp and /run. Only $SBX_DIR and the paths in
# $SBX_BINDS are shared with the host. Then a `systemd --test` dry run, whose
# job list the Go side checks before it answers "go" on stdin, then systemd.
set -eu
S=$SBX_DIR/mnt
mount --make-rprivate /
mkdir -p "$S"
mount -t tmpfs -o mode=755 xenblkd-sbx "$S"
mkdir -p "$S/upper" "$S/work" "$S/root"
mount -t overlay overlay -o "lowerdir=${SBX_LOWER:-/},upperdir=$S/upper,workdir=$S/work" "$S/root"
R=$S/root
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"; mount -o remount,bind,ro "$R/proc/sys"
mount --bind /sys "$R/sys"; mount -o remount,bind,ro "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755 dev "$R/dev"
# Device nodes were made by the Go side in $SBX_DIR/dev (mknod is one
# syscall there, against ~1 ms per exec of mknod(1) for ~800 loop nodes).
cp -a "$SBX_DIR/dev/." "$R/dev/"
touch "$R/dev/console"; mount --bind "$SBX_DIR/console.log" "$R/dev/console"
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"; ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs shm "$R/dev/shm"
mount -t tmpfs -o mode=1777 tmp "$R/tmp"
mount -t tmpfs -o mode=755 run "$R/run"
mkdir -p "$R/run/systemd/system" "$R/run/systemd/system.conf.d"
cp "$SBX_DIR/units/"* "$R/run/systemd/system/"
cp "$SBX_DIR/system.conf.d/"* "$R/run/systemd/system.conf.d/"
# Binds last, so that paths under /tmp or /run land on top of the tmpfs.
mkdir -p "$R$SBX_DIR"; mount --bind "$SBX_DIR" "$R$SBX_DIR"
printf '%s\n' "$SBX_BINDS" | while read -r mode path; do
	[ -n "$path" ] || continue
	if [ -d "$path" ]; then mkdir -p "$R$path"; else mkdir -p "$(dirname "$R$path")"; touch "$R$path"; fi
	mount --bind "$path" "$R$path"
	if [ "$mode" = ro ]; then mount -o remount,bind,ro "$R$path"; fi
done
cd "$R"; mkdir -p oldroot; pivot_root . oldroot; umount -l /oldroot; rmdir /oldroot; cd /
echo "sandbox: pid=$$ root ready; mounts:"; awk '{print $5, $9}' /proc/self/mountinfo
setpriv --reuid=65534 --regid=65534 --clear-groups /lib/systemd/systemd --test --system \
	--unit="$SBX_TARGET" --log-level=notice --no-pager >"$SBX_DIR/dryrun.txt" 2>&1 || echo "sandbox: dry run failed: $?"
touch "$SBX_DIR/dryrun.done"
read -r answer
[ "$answer" = go ] || { echo "sandbox: dry run refused"; exit 1; }
exec /lib/systemd/systemd --system --unit="$SBX_TARGET" --log-target=console \
	--log-level="$SBX_LOGLEVEL" --show-status=no
