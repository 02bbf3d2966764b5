# shellcheck shell=bash
# 26-cdswap.sh: the cd-insert sequence as far as a PV guest allows (group `cd-swap`, xenblkd only).
# Since Xen 4.20 `xl cd-insert` / `cd-eject` on a guest with a device-model stub domain removes the
# stub domain's vbd and adds it again with the new target: a remove and, right after it, an add of
# the same backend (backend/vbd/<domid>/<devid>) with another file. `xl cd-insert` itself needs an
# HVM guest, which this testbed cannot run (no VMX under TCG); a PV guest gets the same sequence
# from `xl block-detach` + `xl block-attach` of the same vdev: the re-added backend gets the new
# target, the guest reads it, and the old target's loop device is freed.

test_cdswap() {
	local p=t26-xenblkd-cdswap old=$WORK/xenblkd-ro.img new=$WORK/xenblkd-d3.img domid be pd seq dev rc
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$p: remove and add of the same backend with another target" || return
	write_cfg "$p" reads "format=raw, vdev=xvda, access=rw, script=xenblkd, target=$WORK/xenblkd-d1.img"
	create "$p"
	check "$p: xl create" "rc=$CREATE_RC: $(xl_errors "$p")" test "$CREATE_RC" = 0
	check "$p: guest reads its disk" "signature mismatch" guest_reads "$p" XBD-DISK-1
	domid=$(domid_of "$p")
	be=backend/vbd/$domid/51728 # xvdb

	say "$p: xl block-attach of xvdb (read-only, $old), then detach + attach of xvdb with $new"
	timeout 120 xl block-attach "$p" "format=raw, vdev=xvdb, access=ro, script=xenblkd, target=$old" \
		>"$OUT/xl-block-attach-$p-1.log" 2>&1
	rc=$?
	check "$p: xl block-attach of xvdb" "rc $rc: $(tail -2 "$OUT/xl-block-attach-$p-1.log" | tr '\n' ' ')" test "$rc" = 0
	seq=$(last_read_seq "$p")
	check "$p: guest reads xvdb (the first target)" "reads failed" reads_after "$p" "${seq:-0}" XBD-DISK-1 XBD-SHARED-RO
	pd=$(timeout 10 xenstore-read "$be/physical-device" 2>/dev/null)
	dev=/dev/loop$((16#${pd#*:}))
	check "$p: xvdb's backend has a loop device on the first target" "physical-device [$pd]: $(losetup -nO BACK-FILE "$dev" 2>/dev/null)" \
		test "$(losetup -nO BACK-FILE "$dev" 2>/dev/null)" = "$old"

	# The swap: detach, then attach at once, as libxl's cd-insert does for a stub domain's vbd.
	timeout 120 xl block-detach "$p" xvdb >"$OUT/xl-block-detach-$p.log" 2>&1
	rc=$?
	check "$p: xl block-detach of xvdb" "rc $rc: $(tail -2 "$OUT/xl-block-detach-$p.log" | tr '\n' ' ')" test "$rc" = 0
	timeout 120 xl block-attach "$p" "format=raw, vdev=xvdb, access=ro, script=xenblkd, target=$new" \
		>"$OUT/xl-block-attach-$p-2.log" 2>&1
	rc=$?
	check "$p: xl block-attach of xvdb again, with another target" "rc $rc: $(tail -2 "$OUT/xl-block-attach-$p-2.log" | tr '\n' ' ')" test "$rc" = 0
	pd=$(timeout 10 xenstore-read "$be/physical-device" 2>/dev/null)
	check "$p: the same backend ($be) names a loop device on the new target" \
		"physical-device [$pd]: $(losetup -nO BACK-FILE "/dev/loop$((16#${pd#*:}))" 2>/dev/null)" \
		test "$(losetup -nO BACK-FILE "/dev/loop$((16#${pd#*:}))" 2>/dev/null)" = "$new"
	seq=$(last_read_seq "$p")
	check "$p: guest reads the new target on xvdb" "reads failed" reads_after "$p" "${seq:-0}" XBD-DISK-1 XBD-DISK-3
	check "$p: the first target's loop device is freed" "loops on $old: $(loops_on "$old")" wait_loops "$old" 0

	timeout 120 xl destroy "$p"
	check "$p: teardown leaves no loop device and no backend" "leftovers" no_leftovers
}
group cd-swap test_cdswap
