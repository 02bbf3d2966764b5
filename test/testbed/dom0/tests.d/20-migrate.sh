# shellcheck shell=bash
# 20-migrate.sh: `xl migrate GUEST localhost` and `xl save` + `xl restore` of a running guest whose
# disks go through xenblkd: a read-write file disk and a phy: disk (a loop device the test made).
# During a migration the receiving domain attaches the disks while the sending one still has them
# read-write: xenblkd allows that only because both domains have the same /local/domain/<id>/vm
# (the same-VM exception, docs/sharing.md). Sourced by suite.sh; group `migrate`.

# loop_of FILE: the loop devices bound to FILE, space-separated.
loop_of() { losetup -nO NAME -j "$1" 2>/dev/null | tr '\n' ' '; }

# wait_loops FILE N: within 60 s exactly N loop devices are bound to FILE.
wait_loops() {
	local deadline=$(($(now) + 60))
	while (($(loops_on "$1") != $2)); do
		(($(now) >= deadline)) && { echo "loops on $1: [$(loop_of "$1")], want $2"; return 1; }
		sleep 1
	done
}

# wait_no_backends DOMID: within 60 s the domain has no vbd backend left.
wait_no_backends() {
	local deadline=$(($(now) + 60))
	while timeout 10 xenstore-list "backend/vbd/$1" >/dev/null 2>&1; do
		(($(now) >= deadline)) && { echo "backend/vbd/$1 still there: [$(vbd_states "$1")]"; return 1; }
		sleep 1
	done
}

# console_name NAME: whose console log shows the guest now. xenconsoled names a log after the
# domain's name when the domain appears, and a migration's receiver appears as NAME--incoming.
console_name() {
	if [[ -e $CONSOLE_DIR/guest-$1--incoming.log ]]; then echo "$1--incoming"; else echo "$1"; fi
}

test_migrate() {
	local name=t20-xenblkd-migrate dev img=$WORK/xenblkd-d1.img domid newdomid seq t0 rc oldloop newloop allowed
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$name: migrate and save/restore" || return
	dev=$(losetup -f --show "$WORK/xenblkd-phy.img") || { fail "$name: losetup" "no loop device"; return; }
	write_cfg "$name" reads "format=raw, vdev=xvda, access=rw, script=xenblkd, target=$img" \
		"backendtype=phy, format=raw, vdev=xvdb, access=rw, script=xenblkd, target=$dev"
	say "$name: a running guest with a rw file disk and a rw phy: disk ($dev), script=xenblkd"
	create "$name"
	check "$name: xl create" "rc=$CREATE_RC: $(xl_errors "$name")" test "$CREATE_RC" = 0
	check "$name: vbds connected" "not Connected" wait_connected "$name" 2
	check "$name: guest reads its disks" "signature mismatch" guest_reads "$name" XBD-DISK-1 XBD-PHY
	domid=$(domid_of "$name")
	oldloop=$(loop_of "$img")

	# A PV guest's live migration tracks dirty pages with shadow paging; a hypervisor built
	# without it (Debian 13's: CONFIG_SHADOW_PAGING is not set) refuses log-dirty mode, and
	# `xl migrate` fails before any disk is touched. Xen says so in virt_caps.
	local caps
	caps=$(timeout 20 xl info | sed -n 's/^virt_caps *: //p')
	if [[ " $caps " != *" shadow "* ]]; then
		report "INFO $name: no xl migrate on this Xen: no shadow paging (virt_caps: $caps), which a PV guest's live migration needs (log-dirty); the same-VM exception during a migration stays unproven here, save + restore runs"
	else
		# xl(1): with an empty ssh command, xl runs <host> itself as the receiver: a local migration.
		seq=$(last_read_seq "$name")
		say "$name: xl migrate of domain $domid to localhost (receiver: xl migrate-receive, no ssh)"
		t0=$EPOCHREALTIME
		timeout 300 xl -vvv migrate -s '' "$name" 'xl -vvv migrate-receive' >"$OUT/xl-migrate-$name.log" 2>&1
		rc=$?
		say "$name: xl migrate rc=$rc in $(elapsed "$t0")s"
		check "$name: xl migrate to localhost succeeds ($(elapsed "$t0")s)" \
			"rc=$rc: $(grep -a 'libxl: error\|migration target' "$OUT/xl-migrate-$name.log" | head -3 | tr '\n' ' ')" test "$rc" = 0
		newdomid=$(domid_of "$name")
		TEST_DOMIDS=("$domid" ${newdomid:+"$newdomid"})
		check "$name: the guest runs in a new domain" "domain ${newdomid:-none}, was $domid" \
			test -n "$newdomid" -a "$newdomid" != "$domid"
		if [[ -n $newdomid && $newdomid != "$domid" ]]; then
			check "$name: new domain's vbds Connected" "states [$(vbd_states "$newdomid")]" \
				test "$(vbd_states "$newdomid")" = "4 4 "
			check "$name: guest keeps reading its disks after the migration" "reads failed" \
				reads_after "$(console_name "$name")" "${seq:-0}" XBD-DISK-1 XBD-PHY
			check "$name: old domain's backends removed" "leftovers" wait_no_backends "$domid"
			check "$name: old domain's loop device released, one left for the new domain" "was [$oldloop]" \
				wait_loops "$img" 1
			newloop=$(loop_of "$img")
			say "$name: loop device on d1.img: before [${oldloop% }], after [${newloop% }]"
			check "$name: phy: device still bound to its image" "$(losetup -nO BACK-FILE "$dev")" \
				test "$(losetup -nO BACK-FILE "$dev" 2>/dev/null)" = "$WORK/xenblkd-phy.img"
			# Both disks were attached while the sender still had them: by the same-VM rule.
			allowed=$(journalctl -b -u xenblkd --no-pager 2>/dev/null | grep -ac "sharing allowed.* domid=$newdomid .*why=\"same VM\" other_domid=$domid ")
			check "$name: xenblkd let the receiver share both disks as the same VM" "$allowed 'sharing allowed' lines, want 2" \
				test "$allowed" = 2
		fi
	fi

	# xl save stops the domain after writing its state; xl restore starts a new domain from it.
	domid=$(domid_of "$name")
	seq=$(last_read_seq "$(console_name "$name")")
	say "$name: xl save of domain $domid, then xl restore"
	t0=$EPOCHREALTIME
	timeout 300 xl -vvv save "$name" "$WORK/$name.save" >"$OUT/xl-save-$name.log" 2>&1
	rc=$?
	check "$name: xl save ($(elapsed "$t0")s)" "rc=$rc" test "$rc" = 0
	check "$name: saved domain's backends removed" "leftovers" wait_no_backends "$domid"
	check "$name: saved domain's loop device released" "loops [$(loop_of "$img")]" wait_loops "$img" 0
	t0=$EPOCHREALTIME
	timeout 300 xl -vvv restore "$WORK/$name.save" >"$OUT/xl-restore-$name.log" 2>&1
	rc=$?
	check "$name: xl restore ($(elapsed "$t0")s)" \
		"rc=$rc: $(grep -a 'libxl: error' "$OUT/xl-restore-$name.log" | head -3 | tr '\n' ' ')" test "$rc" = 0
	newdomid=$(domid_of "$name")
	TEST_DOMIDS+=(${newdomid:+"$newdomid"})
	check "$name: restored domain's vbds connected" "not Connected" wait_connected "$name" 2
	check "$name: restored guest keeps reading its disks" "reads failed" \
		reads_after "$name" "${seq:-0}" XBD-DISK-1 XBD-PHY
	rm -f "$WORK/$name.save"

	timeout 120 xl destroy "$name" >/dev/null 2>&1
	check "$name: teardown leaves the test's own $dev alone and nothing else" "leftovers" no_leftovers "$dev"
	losetup -d "$dev" # our own device, by its path
}

group migrate test_migrate
