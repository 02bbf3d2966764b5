# 50-takeover.sh: `xenblkd takeover` on a host whose guests the stock block script attached
# (issue 14, upgrade scenario). Sourced by suite.sh; group `takeover`.
#
# Guests started under the stock script keep their disks across `xenblkd takeover` and a daemon
# restart; a new guest's rw request for one of their images is refused with xenblkd's message; a
# new guest is attached by xenblkd through the taken-over block; `xl destroy` frees the adopted
# loop devices; after `xenblkd takeover --undo` a guest xenblkd attached is still released when it
# is destroyed. The stock block is restored at the end whatever happened, so later groups run on
# an untouched host.

# tko_img NAME SIG: a 64 MiB image of this group with a signature.
tko_img() {
	truncate -s 64M "$WORK/tko-$1.img"
	printf '%s' "$2" | dd of="$WORK/tko-$1.img" conv=notrunc status=none
}

# tko_loops_gone FILE...: within 60 s no loop device is bound to any FILE.
tko_loops_gone() {
	local deadline=$(($(now) + 60)) f left
	while :; do
		left=""
		for f in "$@"; do
			[[ $(loops_on "$f") == 0 ]] || left="$left $(losetup -nO NAME -j "$f" | tr '\n' ' ')"
		done
		[[ -z $left ]] && return 0
		(($(now) >= deadline)) && break
		sleep 1
	done
	echo "loop devices still bound:$left"
	return 1
}

# tko_autoclear FILE: the one loop device on FILE is AUTOCLEAR (adopted).
tko_autoclear() {
	local dev
	dev=$(losetup -nO NAME -j "$1" | head -1)
	[[ -n $dev && $(losetup -nO AUTOCLEAR "$dev" | tr -d ' ') == 1 ]] && return 0
	echo "loop device on $1: [${dev:-none}] autoclear=[$(losetup -nO AUTOCLEAR "$dev" 2>/dev/null | tr -d ' ')]"
	return 1
}

# tko_status_has DOMID N: `xenblkd status` lists N attachments of domain DOMID.
tko_status_has() {
	local got
	got=$(timeout 30 xenblkd status --json | grep -c "\"domid\": $1,")
	[[ $got == "$2" ]] && return 0
	echo "xenblkd status lists $got attachment(s) of domain $1, want $2"
	timeout 30 xenblkd status
	return 1
}

tko_block_is_stock() {
	[[ -f /etc/xen/scripts/block && ! -L /etc/xen/scripts/block ]] &&
		grep -q block-common.sh /etc/xen/scripts/block &&
		[[ -z $(dpkg-divert --listpackage /etc/xen/scripts/block) ]]
}

tko_cleanup() {
	local g
	for g in t50-stock t50-rw-b t50-new; do timeout 120 xl destroy "$g" >/dev/null 2>&1; done
	if ! tko_block_is_stock; then
		say "takeover: restoring the stock block script"
		timeout 60 xenblkd takeover --undo || report "INFO takeover: xenblkd takeover --undo failed in cleanup"
	fi
	tko_block_is_stock || report "INFO takeover: /etc/xen/scripts/block is not the stock script after cleanup"
}

test_takeover() {
	local p=t50 out msg seq domid t0
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$p: takeover" || return
	check "$p: block is the stock script before the takeover" "block: $(ls -l /etc/xen/scripts/block)" tko_block_is_stock
	tko_img d1 TKO-D1
	tko_img ro TKO-RO
	tko_img new TKO-NEW

	# Guests of the stock script: no script= in the disk spec, as libvirt and most configs have.
	write_cfg "$p-stock" reads "format=raw, vdev=xvda, access=rw, target=$WORK/tko-d1.img" \
		"format=raw, vdev=xvdb, access=ro, target=$WORK/tko-ro.img"
	say "$p: a guest with 2 disks attached by the stock block script (no script= in the spec)"
	create "$p-stock"
	check "$p: stock guest created" "rc=$CREATE_RC: $(xl_errors "$p-stock")" test "$CREATE_RC" = 0
	check "$p: stock guest's vbds connected" "not Connected" wait_connected "$p-stock" 2
	check "$p: stock guest reads its disks" "signature mismatch" guest_reads "$p-stock" TKO-D1 TKO-RO
	domid=$(domid_of "$p-stock")

	seq=$(last_read_seq "$p-stock")
	t0=$EPOCHREALTIME
	out=$(timeout 120 xenblkd takeover 2>&1)
	local rc=$?
	say "$p: xenblkd takeover (rc=$rc, $(elapsed "$t0")s): $(tr '\n' ' ' <<<"$out")"
	check "$p: xenblkd takeover succeeds" "rc=$rc: $out" test "$rc" = 0
	check "$p: block is diverted by xenblkd and links to it" "$(ls -l /etc/xen/scripts/block) $(dpkg-divert --list /etc/xen/scripts/block)" \
		eval '[[ $(dpkg-divert --listpackage /etc/xen/scripts/block) == xenblkd && -L /etc/xen/scripts/block && /etc/xen/scripts/block -ef /etc/xen/scripts/xenblkd ]]'
	check "$p: the stock script is kept as block.xenblkd-orig" "missing" grep -q block-common.sh /etc/xen/scripts/block.xenblkd-orig
	check "$p: block-iscsi is untouched" "changed" eval '[[ -f /etc/xen/scripts/block-iscsi && ! -L /etc/xen/scripts/block-iscsi ]]'
	check "$p: takeover adopted both stock loop devices" "$out" grep -q "took over 2 loop device" <<<"$out"
	check "$p: xenblkd status lists the stock guest's disks" "not listed" tko_status_has "$domid" 2
	check "$p: the adopted rw device is AUTOCLEAR now" "not adopted" tko_autoclear "$WORK/tko-d1.img"
	check "$p: stock guest still reads its disks after the takeover" "reads failed" \
		reads_after "$p-stock" "${seq:-0}" TKO-D1 TKO-RO

	seq=$(last_read_seq "$p-stock")
	timeout 120 systemctl restart xenblkd.service
	check "$p: xenblkd active after restart" "$(systemctl is-active xenblkd)" systemctl is-active -q xenblkd
	check "$p: adopted disks still listed after the restart" "lost" tko_status_has "$domid" 2
	check "$p: stock guest still reads its disks after the restart" "reads failed" \
		reads_after "$p-stock" "${seq:-0}" TKO-D1 TKO-RO
	check "$p: stock guest's vbds still Connected" "states [$(vbd_states "$domid")]" test "$(vbd_states "$domid")" = "4 4 "

	# A second guest asks for the adopted rw image: refused by xenblkd's sharing rules.
	write_cfg "$p-rw-b" 0 "format=raw, vdev=xvda, access=rw, target=$WORK/tko-d1.img"
	create "$p-rw-b"
	check "$p: a second guest's rw request for the adopted image fails" "xl create rc=$CREATE_RC" test "$CREATE_RC" != 0
	msg=$(grep -a 'libxl.*error.*script: ' "$OUT/xl-create-$p-rw-b.log" | sed 's/.*script: //' | head -1)
	say "$p: the refusal as xl reports it: ${msg:-<none>}"
	check "$p: the refusal is xenblkd's and names the stock guest's domain" "got [$msg]" \
		eval '[[ $msg == *"refusing to attach"*"domain $domid device"* ]]'
	timeout 120 xl destroy "$p-rw-b" >/dev/null 2>&1

	# A new guest under the taken-over block: attached by xenblkd.
	write_cfg "$p-new" idle "format=raw, vdev=xvda, access=rw, target=$WORK/tko-new.img"
	create "$p-new"
	check "$p: new guest created through the taken-over block" "rc=$CREATE_RC: $(xl_errors "$p-new")" test "$CREATE_RC" = 0
	check "$p: new guest connected" "not Connected" wait_connected "$p-new" 1
	check "$p: new guest reads its disk" "signature mismatch" guest_reads "$p-new" TKO-NEW
	check "$p: the new guest's device is xenblkd's (diskseq recorded)" "no diskseq node" \
		eval 'timeout 10 xenstore-read "backend/vbd/$(domid_of "$p-new")/51712/diskseq" >/dev/null'

	timeout 120 xl destroy "$p-stock"
	check "$p: xl destroy of the stock guest frees its adopted loop devices" "leaked" \
		tko_loops_gone "$WORK/tko-d1.img" "$WORK/tko-ro.img"

	out=$(timeout 60 xenblkd takeover --undo 2>&1)
	check "$p: xenblkd takeover --undo succeeds" "rc=$?: $out" test $? = 0
	check "$p: block is the stock script again" "$(ls -l /etc/xen/scripts/block)" tko_block_is_stock
	local newdom
	newdom=$(domid_of "$p-new")
	timeout 120 xl destroy "$p-new"
	check "$p: after the undo, xl destroy of xenblkd's guest frees its loop device" "leaked" \
		tko_loops_gone "$WORK/tko-new.img"
	check "$p: ... and the daemon released it" "still attached" tko_status_has "${newdom:-none}" 0
	tko_cleanup
}
group takeover test_takeover
