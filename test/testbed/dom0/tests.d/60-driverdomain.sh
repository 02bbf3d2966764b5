# shellcheck shell=bash
# 60-driverdomain.sh: xenblkd in a real storage driver domain (group `driver-domain`, xenblkd only).
#
# The driver domain is a second PV domain (driver_domain=1) running dom0's own kernel with the
# cached initramfs /root/driverdom/initrd-base.gz (configure-rootfs.sh: busybox, Debian's xl and
# xenstore client, xen-blkback, loop; image/driverdom-init as /init) plus a second cpio archive
# appended here at test time: this tree's xenblkd as /usr/sbin/xenblkd, the hotplug entry as
# /etc/xen/scripts/xenblkd and /xbd/init (below). There it starts the daemon (no systemd, no
# xenstored: XenStore through /dev/xen/xenbus) and `xl devd`, makes a 64 MiB image on a tmpfs, and
# serves commands dom0 writes to its own XenStore directory data/xbd (cmd, seq -> out, rc, done):
# every check below that looks inside the driver domain runs there that way, and every command,
# its output and the domain's logs land on its console (guest-t60-storage.log in the results).
#
# Checked: the daemon holds /dev/xen/xenbus open; a guest whose disk names the driver domain
# (backend=, script=xenblkd, a target that exists only there) gets its vbd Connected and reads the
# image's signature; a second guest asking for the same image read-write is refused (xenblkd's
# message in the backend's hotplug-error; dom0's libxl does not wait for a driver domain's hotplug
# script, so its xl create succeeds and its vbd never connects); `xl destroy` of the guest frees
# the loop device in the driver domain and devd removes the backend; xenblkd's log there shows the
# attach and the release.

DD_NAME=t60-storage
DD_BASE=/root/driverdom/initrd-base.gz
DD_INITRD=$WORK/driverdom-initrd
DD_IMG=/srv/dd-d1.img # inside the driver domain
DD_DOMID=""
DD_SEQ_FILE=$WORK/driverdom-seq # the last command's number (a file: dd_run also runs in $(...))

# dd_initrd: the driver domain's initramfs, $DD_INITRD: the cached base + an archive with xenblkd.
dd_initrd() {
	local dir=$WORK/driverdom-extra
	rm -rf "$dir" && mkdir -p "$dir"/{xbd,usr/sbin,etc/xen/scripts} || return 1
	install -m 755 /usr/sbin/xenblkd "$dir/usr/sbin/xenblkd"
	install -m 755 /etc/xen/scripts/xenblkd "$dir/etc/xen/scripts/xenblkd"
	cat >"$dir/xbd/init" <<'EOF'
#!/bin/sh
# /xbd/init of the storage driver domain (from 60-driverdomain.sh; run by /init after the mounts
# and insmods). DD lines go to the console, which dom0's xenconsoled logs.
export PATH=/bin:/usr/bin:/usr/sbin
xs=data/xbd
echo "DD-XBD start uptime=$(cut -d' ' -f1 /proc/uptime) domid=$(xenstore-read domid)"
ln -s /run /var/run
mkdir -p /run/xen /var/lib/xen /var/log/xen
# The disk images this domain serves: a tmpfs, so the target exists only here.
mount -t tmpfs -o size=96m srv /srv
truncate -s 64M /srv/dd-d1.img
printf 'XBD-DRIVERDOM-1' | dd of=/srv/dd-d1.img conv=notrunc 2>/dev/null
# xenblkd: no systemd here, so the daemon runs in the background and logs to a file (slog text).
mkdir -p -m 700 /run/xenblkd
XENBLKD_LOG_LEVEL=debug /usr/sbin/xenblkd daemon >/var/log/xenblkd.log 2>&1 &
end=$(($(cut -d. -f1 /proc/uptime) + 60))
while [ ! -S /run/xenblkd/api.sock ] && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.1; done
echo "DD-XBD xenblkd: $(grep -m1 'msg=serving' /var/log/xenblkd.log || tail -3 /var/log/xenblkd.log)"
# xl devd runs the backends' hotplug scripts (upstream's xendriverdomain.service runs it).
xl -vvv devd -F >/var/log/xen/xl-devd.log 2>&1 &
# Our command channel: dom0 writes cmd and then seq; we answer with out, rc and done=seq.
xenstore-write $xs/cmd "" $xs/out "" $xs/rc "" $xs/done 0 $xs/seq 0
xenstore-write $xs/state ready
echo "DD-XBD ready uptime=$(cut -d' ' -f1 /proc/uptime)"
last=0
while :; do
	seq=$(xenstore-read $xs/seq 2>/dev/null)
	if [ -n "$seq" ] && [ "$seq" != "$last" ]; then
		cmd=$(xenstore-read -R $xs/cmd)
		echo "DD-CMD $seq: $cmd"
		sh -c "$cmd" >/tmp/out 2>&1
		rc=$?
		cat /tmp/out
		echo "DD-RC $seq rc=$rc"
		xenstore-write -R $xs/out "$(tail -c 1500 /tmp/out | tr '\n' '|')" $xs/rc "$rc" $xs/done "$seq"
		last=$seq
		continue
	fi
	# The first event fires at once; the second is the next write. The timeout covers a write
	# between the read above and the watch.
	timeout 5 xenstore-watch -n 2 $xs/seq >/dev/null 2>&1
done
EOF
	chmod 755 "$dir/xbd/init"
	{ cat "$DD_BASE" && (cd "$dir" && find . | cpio -o -H newc --quiet); } >"$DD_INITRD"
}

# dd_run CMD: run CMD (sh -c) in the driver domain within 60 s; sets DD_RC and DD_OUT (its last
# 1500 bytes, newlines as '|'). False if no answer came.
dd_run() {
	local xs=/local/domain/$DD_DOMID/data/xbd deadline=$(($(now) + 60)) seq
	seq=$(($(cat "$DD_SEQ_FILE" 2>/dev/null || echo 0) + 1))
	echo "$seq" >"$DD_SEQ_FILE"
	DD_RC="" DD_OUT=""
	timeout 10 xenstore-write -R "$xs/cmd" "$1" "$xs/seq" "$seq" || { DD_OUT="xenstore-write failed"; return 1; }
	while (($(now) < deadline)); do
		if [[ $(timeout 10 xenstore-read "$xs/done" 2>/dev/null) == "$seq" ]]; then
			DD_RC=$(timeout 10 xenstore-read "$xs/rc")
			DD_OUT=$(timeout 10 xenstore-read -R "$xs/out")
			return 0
		fi
		sleep 0.2
	done
	DD_OUT="no answer from the driver domain within 60 s"
	return 1
}
# dd_ok CMD: CMD succeeds in the driver domain (its output is printed).
dd_ok() {
	dd_run "$1" || { echo "dd: $DD_OUT"; return 1; }
	echo "dd [$1] rc=$DD_RC: $DD_OUT"
	[[ $DD_RC == 0 ]]
}
# dd_loops: how many loop devices in the driver domain are backed by its image.
DD_LOOPS_CMD="cat /sys/block/loop*/loop/backing_file 2>/dev/null | grep -cxF $DD_IMG"
dd_loops() { dd_run "$DD_LOOPS_CMD" && echo "${DD_OUT%|}"; }

# dd_backend DOMID: the driver domain's backend directory of DOMID's first disk (dom0's view).
dd_backend() { echo "/local/domain/$DD_DOMID/backend/vbd/$1/51712"; }

# dd_wait_state DOMID STATE SECS: the backend of DOMID's disk in the driver domain reaches STATE.
dd_wait_state() {
	local be st deadline=$(($(now) + $3)) t0=$EPOCHREALTIME
	be=$(dd_backend "$1")
	while (($(now) < deadline)); do
		st=$(timeout 10 xenstore-read "$be/state" 2>/dev/null)
		[[ $st == "$2" ]] && { echo "$be: state $st after $(elapsed "$t0")s"; return 0; }
		sleep 0.5
	done
	echo "$be: state [${st:-none}] after $3 s, hotplug-error [$(timeout 10 xenstore-read "$be/hotplug-error" 2>/dev/null)]"
	return 1
}

# dd_gone DOMID SECS: within SECS, DOMID's backend directory is gone (devd removes it after the
# hotplug remove), as the driver domain sees it and as dom0 does (the driver domain's
# xenstore-exists is also false for a node it may not read; dom0 reads everything).
dd_gone() {
	local deadline=$(($(now) + $2)) t0=$EPOCHREALTIME
	while (($(now) < deadline)); do
		if ! timeout 10 xenstore-exists "$(dd_backend "$1")" && dd_run "! xenstore-exists backend/vbd/$1/51712" && [[ $DD_RC == 0 ]]; then
			echo "backend/vbd/$1/51712 gone in the driver domain $(elapsed "$t0")s after xl destroy returned"
			return 0
		fi
		sleep 0.5
	done
	echo "backend/vbd/$1/51712 still there after $2 s"
	return 1
}

# dd_freed DOMID SECS: within SECS, inside the driver domain no loop device is bound to the image
# and DOMID's backend directory is gone (as in dd_gone).
dd_freed() {
	local deadline=$(($(now) + $2)) t0=$EPOCHREALTIME
	while (($(now) < deadline)); do
		if dd_run "n=\$($DD_LOOPS_CMD); echo loops=\$n; xenstore-exists backend/vbd/$1/51712 && echo backend-left; [ \"\$n\" = 0 ] && ! xenstore-exists backend/vbd/$1/51712"; then
			[[ $DD_RC == 0 ]] && ! timeout 10 xenstore-exists "$(dd_backend "$1")" && { echo "freed in the driver domain $(elapsed "$t0")s after xl destroy returned"; return 0; }
		fi
		sleep 0.5
	done
	echo "not freed in the driver domain after $2 s: $DD_OUT"
	return 1
}

test_driver_domain() {
	local p=t60-xenblkd-dd g=t60-xenblkd-dd-a g2=t60-xenblkd-dd-b spec gid g2id msg t0 ready_s logs n
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	rm -f "$DD_SEQ_FILE"
	xenblkd_ready "$p: driver domain" || return
	if [[ ! -f $DD_BASE ]]; then
		fail "$p: driver domain initramfs" "$DD_BASE missing: the testbed image predates the driver domain (test/testbed/build-image.sh --force)"
		return
	fi
	t0=$EPOCHREALTIME
	dd_initrd || { fail "$p: driver domain initramfs" "building $DD_INITRD failed"; return; }
	say "$p: driver domain initramfs: $(du -k "$DD_INITRD" | cut -f1) KiB, built in $(elapsed "$t0")s"
	cat >"$WORK/$DD_NAME.cfg" <<EOF
name = "$DD_NAME"
type = "pv"
kernel = "/root/domu/vmlinux"
ramdisk = "$DD_INITRD"
extra = "console=hvc0 loglevel=6"
memory = 256
vcpus = 1
driver_domain = 1
on_poweroff = "destroy"
on_crash = "destroy"
EOF
	say "$p: xl create of the storage driver domain $DD_NAME (driver_domain=1)"
	t0=$EPOCHREALTIME
	create "$DD_NAME"
	if ((CREATE_RC != 0)); then
		fail "$p: xl create of the driver domain" "rc=$CREATE_RC: $(xl_errors "$DD_NAME")"
		return
	fi
	DD_DOMID=$(domid_of "$DD_NAME")
	local deadline=$(($(now) + 180)) st=""
	while (($(now) < deadline)); do
		st=$(timeout 10 xenstore-read "/local/domain/$DD_DOMID/data/xbd/state" 2>/dev/null)
		[[ $st == ready ]] && break
		sleep 1
	done
	ready_s=$(elapsed "$t0")
	if [[ $st != ready ]]; then
		fail "$p: driver domain up (xenblkd and xl devd started)" "no data/xbd/state=ready within 180 s: see guest-$DD_NAME.log"
		timeout 120 xl destroy "$DD_NAME"
		return
	fi
	pass "$p: driver domain $DD_NAME (domain $DD_DOMID) up, xenblkd and xl devd started (${ready_s}s from xl create)"
	check "$p: xenblkd there talks to XenStore through /dev/xen/xenbus (no xenstored in the domain)" "see the driver domain's console" \
		dd_ok 'pid=$(pidof xenblkd) && ls -l /proc/$pid/fd | grep -q /dev/xen/xenbus && ! pidof xenstored && [ ! -e /run/xenstored/socket ] && pidof xl'

	# A guest whose disk is in the driver domain.
	spec="format=raw, vdev=xvda, access=rw, backend=$DD_NAME, backendtype=phy, script=xenblkd, target=$DD_IMG"
	write_cfg "$g" idle "$spec"
	write_cfg "$g2" idle "$spec"
	say "$p: guest $g with disk [$spec]"
	create "$g"
	check "$p: xl create of a guest whose disk is served by the driver domain (${CREATE_S}s)" "rc=$CREATE_RC: $(xl_errors "$g")" \
		test "$CREATE_RC" = 0
	gid=$(domid_of "$g")
	if [[ -z $gid ]]; then
		fail "$p: guest running" "no domain $g"
	else
		check "$p: the vbd in the driver domain reaches state 4 (Connected)" "not Connected" dd_wait_state "$gid" 4 150
		check "$p: the guest reads the driver domain's image" "signature mismatch" guest_reads "$g" XBD-DRIVERDOM-1
		n=$(dd_loops)
		check "$p: one loop device on the image in the driver domain" "loops: $n" test "$n" = 1
		check "$p: the driver domain reads physical-device in its backend, and no hotplug-error" "see the driver domain's console" \
			dd_ok "xenstore-read backend/vbd/$gid/51712/physical-device && ! xenstore-exists backend/vbd/$gid/51712/hotplug-error"
		dd_run 'xenblkd status 2>&1'
		report "INFO $p: xenblkd status in the driver domain: $DD_OUT"

		# A second guest asking for the same image read-write.
		say "$p: a second guest asks for $DD_IMG read-write too"
		create "$g2"
		g2id=$(domid_of "$g2")
		if ((CREATE_RC != 0)); then
			msg=$(grep -a 'libxl.*error.*script: ' "$OUT/xl-create-$g2.log" | sed 's/.*script: //' | head -1)
			report "INFO $p: xl create of the second guest failed (rc=$CREATE_RC): ${msg:-$(xl_errors "$g2")}"
		elif [[ -n $g2id ]]; then
			local dl=$(($(now) + 60))
			while (($(now) < dl)); do
				msg=$(timeout 10 xenstore-read "$(dd_backend "$g2id")/hotplug-error" 2>/dev/null) && break
				sleep 0.5
			done
			report "INFO $p: xl create of the second guest returned 0 (dom0's libxl does not wait for a driver domain's hotplug script)"
			check "$p: the second guest's vbd does not connect" "state $(timeout 10 xenstore-read "$(dd_backend "$g2id")/state" 2>&1)" \
				test "$(timeout 10 xenstore-read "$(dd_backend "$g2id")/state" 2>/dev/null)" != 4
		fi
		say "$p: refusal: ${msg:-<none>}"
		check "$p: the second rw request is refused with xenblkd's message" "hotplug-error [${msg:-none}]" \
			eval '[[ $msg == *"$DD_IMG"*read-write* ]]'
		[[ -n $g2id ]] && timeout 120 xl destroy "$g2"
		n=$(dd_loops)
		check "$p: still one loop device on the image after the refusal" "loops: $n" test "$n" = 1
		if [[ -n $g2id ]]; then
			check "$p: xl destroy of the refused guest: devd removes its backend in the driver domain" "still there" \
				dd_gone "$g2id" 60
		fi

		say "$p: xl destroy of $g (domain $gid)"
		destroy "$g"
		check "$p: xl destroy of the guest (${DESTROY_S}s)" "rc=$DESTROY_RC" test "$DESTROY_RC" = 0
		check "$p: xl destroy frees the loop device in the driver domain and devd removes the backend" "still there" \
			dd_freed "$gid" 60
		check "$p: xl devd in the driver domain logs the hotplug add and remove as succeeded" "see its log on the driver domain's console" \
			dd_ok "grep -cE 'backend/vbd/$gid/51712 (add|remove) succeed' /var/log/xen/xl-devd.log | grep -qx 2"
		logs='grep -E "msg=(attached|released|refused)" /var/log/xenblkd.log'
		dd_run "$logs"
		report "INFO $p: xenblkd log in the driver domain: $DD_OUT"
		check "$p: xenblkd's log in the driver domain shows the attach and the release of domain $gid" "log: $DD_OUT" \
			eval '[[ $DD_OUT == *"msg=attached"*" domid=$gid "* && $DD_OUT == *"msg=released"*" domid=$gid "* ]]'
	fi

	report "INFO $p: left under the driver domain's backend directory (dom0's view): [$(timeout 10 xenstore-ls -f "/local/domain/$DD_DOMID/backend" 2>&1 | tr '\n' ' ')]"
	# The domain's logs onto its console (copied into the results), then it goes.
	dd_run 'echo "--- /var/log/xenblkd.log"; cat /var/log/xenblkd.log; echo "--- /var/log/xen/xl-devd.log"; cat /var/log/xen/xl-devd.log' >/dev/null
	timeout 120 xl destroy "$DD_NAME"
	for name in "$g" "$g2"; do domid_of "$name" >/dev/null && timeout 120 xl destroy "$name"; done
	return 0
}

group driver-domain test_driver_domain
