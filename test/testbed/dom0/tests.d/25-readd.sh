# shellcheck shell=bash
# 25-readd.sh: a guest destroyed and another started at once on the same image (as xl reboot does)
# while something in dom0 still holds the old domain's loop device open, as udev's blkid probe
# does after a writer (the daemon releasing its read-write fd) closes it. xenblkd released that device, so the new domain's
# add waits for it to be freed (up to 2 s) instead of refusing it as a foreign loop device
# (docs/sharing.md, rule 4). The holder lets go once xenblkd logs that it waits. Sourced by suite.sh; group `readd`.

test_readd() {
	local name=t25-xenblkd-readd img=$WORK/xenblkd-d1.img dev held=$WORK/t25-held holder domid newdomid freed
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$name: re-add while the released loop device is held" || return
	write_cfg "$name" idle "format=raw, vdev=xvda, access=rw, script=xenblkd, target=$img"
	write_cfg "$name-b" 0 "format=raw, vdev=xvda, access=rw, script=xenblkd, target=$img"
	create "$name"
	check "$name: xl create" "rc=$CREATE_RC: $(xl_errors "$name")" test "$CREATE_RC" = 0
	check "$name: vbd connected" "not Connected" wait_connected "$name" 1
	domid=$(domid_of "$name")
	dev=$(losetup -nO NAME -j "$img" | head -1)

	# The holder opens the device and closes it once xenblkd logs that the new domain's add waits
	# for it (pre-setup starts that add when the backend appears), or after 60 s. It follows the
	# journal from before it opened the device, so the line cannot pass unseen; the follower does
	# not inherit the device (9<&-), and the holder closes it as soon as grep has the line.
	rm -f "$held"
	(
		since=@$(date +%s)
		exec 9<"$dev" && touch "$held"
		grep -a -m1 -q "waiting for the loop device xenblkd released to be freed" \
			< <(timeout 60 journalctl -b -f --since "$since" -o cat -u xenblkd 9<&- 2>/dev/null)
		exec 9<&-
	) &
	holder=$!
	local deadline=$(($(now) + 30))
	until [[ -e $held ]] || (($(now) >= deadline)); do sleep 0.05; done
	check "$name: dom0's holder has $dev open" "no $held within 30 s" test -e "$held"
	say "$name: dom0 holds $dev open; xl destroy of domain $domid, then xl create of $name-b on the same image"
	timeout 120 xl destroy "$name"
	check "$name: the old domain's $dev, released by xenblkd, stays bound while held" "loops [$(losetup -nO NAME -j "$img" | tr '\n' ' ')]" \
		test "$(loops_on "$img")" = 1
	create "$name-b"
	wait "$holder"
	newdomid=$(domid_of "$name-b")
	TEST_DOMIDS=("$domid" ${newdomid:+"$newdomid"})
	check "$name: xl create on the same image succeeds" "rc=$CREATE_RC: $(xl_errors "$name-b")" test "$CREATE_RC" = 0
	check "$name: the new domain reads the image" "signature mismatch" guest_reads "$name-b" XBD-DISK-1
	freed=$(journalctl -b -u xenblkd --no-pager 2>/dev/null | grep -a "the loop device xenblkd released is freed.* domid=$newdomid " | tail -1)
	say "$name: xenblkd: ${freed:-no wait logged}"
	check "$name: xenblkd waited for the released device instead of refusing it" "no 'released is freed' line for domain $newdomid" \
		test -n "$freed"
	wait_gone "$name-b"
	check "$name: teardown leaves nothing" "leftovers" no_leftovers
	rm -f "$held"
}

group readd test_readd
