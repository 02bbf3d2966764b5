# shellcheck shell=bash
# 45-fdstore.sh: the systemd fd store across `systemctl stop xenblkd` / `start` (group `fdstore`,
# xenblkd only; docs/fdstore.md). An idle loop device pre-setup made (no xen-blkback has it open
# yet) lives only in xenblkd and in systemd's copy in the store. Where the unit keeps the store
# across a stop (FileDescriptorStorePreserve=yes, systemd >= 254) the device stays bound over the
# stop and the next start adopts it from the store: same device, same diskseq, `adopted=1`, not
# made again. Where it does not (systemd 252 ignores the setting) the stop drops the store and
# the idle device is freed at once, the behaviour docs/fdstore.md describes for 252.
#
# The backend is written by hand as libxl writes it (one domain id no domain has, state 2 as after
# blkback's probe), with the xen-backend bus's autoprobe off: the kernel registers the backend's
# xenbus device but binds no driver, so blkback never opens the loop device and it stays idle.

# fds_write PATH VALUE...: xenstore-write of PATH VALUE pairs under the test's backend.
fds_write() { timeout 20 xenstore-write "$@"; }

# fds_phys BE: within 30 s the backend BE has a physical-device (pre-setup attached it); prints it.
fds_phys() {
	local deadline=$(($(now) + 30)) pd
	while (($(now) < deadline)); do
		pd=$(timeout 10 xenstore-read "$1/physical-device" 2>/dev/null) && [[ -n $pd ]] && { echo "$pd"; return 0; }
		sleep 0.5
	done
	return 1
}

# fds_bound DEV FILE: DEV is bound to FILE.
fds_bound() { [[ $(losetup -nO BACK-FILE "$1" 2>/dev/null) == "$2" ]]; }

# fds_freed DEV FILE: within 20 s DEV is no longer bound to FILE.
fds_freed() {
	local deadline=$(($(now) + 20))
	while fds_bound "$1" "$2"; do
		(($(now) >= deadline)) && { echo "$1 still bound to $2"; return 1; }
		sleep 0.5
	done
}

# fds_stored: how many fds systemd holds in xenblkd's store.
fds_stored() { systemctl show -p NFileDescriptorStore --value xenblkd; }

test_fdstore() {
	local p=t45-xenblkd-fdstore img=$WORK/xenblkd-fds.img domid=30045 devid=51712 be fe dom pd dev n seq0
	local preserve sdver cursor line autoprobe=/sys/bus/xen-backend/drivers_autoprobe
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=("$domid")
	xenblkd_ready "$p: fd store across systemctl stop/start" || return
	sdver=$(systemctl --version | awk 'NR == 1 {print $2}')
	preserve=$(systemctl show -p FileDescriptorStorePreserve --value xenblkd 2>/dev/null)
	say "$p: systemd $sdver, FileDescriptorStorePreserve=${preserve:-<unknown to this systemd>} ($(systemctl show -p FragmentPath --value xenblkd))"
	truncate -s 64M "$img"
	printf 'XBD-FDSTORE' | dd of="$img" conv=notrunc status=none
	be=/local/domain/0/backend/vbd/$domid/$devid
	fe=/local/domain/$domid/device/vbd/$devid
	dom=/local/domain/$domid
	[[ -w $autoprobe ]] || { fail "$p: $autoprobe" "not writable: blkback would open the device"; return; }
	echo 0 >"$autoprobe"
	fds_write "$dom/vm" "/vm/00000000-0000-0000-0000-0000000$domid" "$dom/name" "$p" \
		"$fe/backend" "${be#/local/domain/0/}" "$fe/backend-id" 0 "$fe/state" 1 "$fe/virtual-device" "$devid" \
		"$fe/device-type" disk \
		"$be/frontend" "$fe" "$be/frontend-id" "$domid" "$be/online" 1 "$be/removable" 0 "$be/bootable" 1 \
		"$be/dev" xvda "$be/type" phy "$be/device-type" disk "$be/discard-enable" 1 "$be/specification" xen \
		"$be/mode" w "$be/script" /etc/xen/scripts/xenblkd "$be/state" 2 "$be/params" "$img"
	pd=$(fds_phys "$be")
	check "$p: pre-setup attached the hand-written backend (physical-device $pd)" "no physical-device within 30 s" test -n "$pd"
	if [[ -z $pd ]]; then
		timeout 20 xenstore-rm "/local/domain/0/backend/vbd/$domid"; timeout 20 xenstore-rm "$dom"
		echo 1 >"$autoprobe"
		return
	fi
	dev=/dev/loop$((16#${pd#*:}))
	seq0=$(cat "/sys/block/${dev#/dev/}/diskseq" 2>/dev/null)
	n=$(fds_stored)
	check "$p: $dev bound to the image and in the store ($n fds)" \
		"bound to [$(losetup -nO BACK-FILE "$dev")], store $n" eval 'fds_bound "$dev" "$img" && ((n >= 1))'

	say "$p: systemctl stop xenblkd (the socket stays), then start"
	timeout 120 systemctl stop xenblkd.service
	if [[ $preserve == yes ]]; then
		check "$p: after stop, the store is kept ($(fds_stored) fds) and $dev stays bound" \
			"store $(fds_stored), $dev bound to [$(losetup -nO BACK-FILE "$dev")]" \
			eval '(($(fds_stored) >= 1)) && fds_bound "$dev" "$img"'
	else
		check "$p: after stop, the store is dropped (systemd $sdver) and the idle $dev is freed" "store $(fds_stored)" \
			eval '(($(fds_stored) == 0)) && fds_freed "$dev" "$img"'
	fi
	cursor=$(journalctl -u xenblkd -n 1 --show-cursor -o cat 2>/dev/null | sed -n 's/^-- cursor: //p')
	timeout 120 systemctl start xenblkd.service
	check "$p: xenblkd active after start" "$(systemctl is-active xenblkd)" systemctl is-active -q xenblkd
	# Type=notify: the recovery line is written before READY=1, so it is in the journal by now.
	line=$(journalctl -u xenblkd --after-cursor "$cursor" -o cat 2>/dev/null | grep -a -m1 'msg="recovery done"')
	say "$p: ${line:-no recovery line}"
	if [[ $preserve == yes ]]; then
		check "$p: start adopted $dev from the store (adopted=1, nothing reopened or made again)" "[$line]" \
			eval '[[ $line == *" adopted=1 "* && $line == *" reopened=0 "* ]]'
		check "$p: $dev is the same device (diskseq $seq0) and still bound" \
			"diskseq $(cat "/sys/block/${dev#/dev/}/diskseq" 2>/dev/null), bound to [$(losetup -nO BACK-FILE "$dev")]" \
			eval '[[ $(cat "/sys/block/${dev#/dev/}/diskseq" 2>/dev/null) == "$seq0" ]] && fds_bound "$dev" "$img"'
		check "$p: xenblkd status lists it for domain $domid" "$(timeout 30 xenblkd status 2>&1 | head -5 | tr '\n' ' ')" \
			eval 'timeout 30 xenblkd status 2>/dev/null | grep -E "^$domid " | grep -q "${dev#/dev/}"'
	else
		check "$p: start had nothing to adopt from the store (adopted=0)" "[$line]" eval '[[ $line == *" adopted=0 "* ]]'
	fi

	timeout 20 xenstore-rm "/local/domain/0/backend/vbd/$domid"
	timeout 20 xenstore-rm "$dom"
	echo 1 >"$autoprobe"
	check "$p: removing the backend frees $dev" "still bound" fds_freed "$dev" "$img"
	check "$p: teardown leaves no loop device and no backend" "leftovers" no_leftovers
}
group fdstore test_fdstore
