# 40-package.sh: the Debian package, installed and then upgraded to a newer build while a guest
# runs on two xenblkd disks (sourced by suite.sh; group `package`). The packages come from
# `make testbed-debs` (an older version and this tree's), copied by e2e.sh to ./debs/.
#
# What it shows: dpkg -i of the old package takes over the running daemon (unit from
# /usr/lib/systemd/system, enabled and running; systemd 252 names it by its /lib alias), the upgrade restarts it through deb-systemd-invoke
# and the guest never loses its disks (reads go on, vbds stay Connected, the same loop devices);
# md5sums verify; `dpkg -r` is refused while the guest uses the disks; a refused add is one line
# at journald priority warning (`journalctl -p warning`), an attach is not.

# pkg_version: the installed version of xenblkd, or "none".
pkg_version() { dpkg-query -W -f='${Version}' xenblkd 2>/dev/null || echo none; }

# deb_version FILE: the version in a .deb.
deb_version() { dpkg-deb -f "$1" Version; }

# still_installed: prerm refused the removal: the package and the daemon are still there
# (dpkg -r has set the selection to deinstall: "deinstall ok installed").
still_installed() {
	grep -q 'refusing to remove xenblkd' "$OUT/dpkg-remove.log" &&
		[[ $(dpkg-query -W -f='${Status}' xenblkd 2>/dev/null) == *' ok installed' ]] &&
		systemctl is-active -q xenblkd
}
no_info_lines() { ! grep -q 'level=INFO' "$OUT/journal-warning.txt"; }
verified() { [[ -z $(dpkg --verify xenblkd 2>&1) ]]; }
# doctor_ok: xenblkd doctor exits 0, and its hypervisor, unit-flags and script-link checks pass.
doctor_ok() {
	xenblkd doctor >"$OUT/doctor-package.txt" 2>&1 || return 1
	local c
	for c in hypervisor unit-flags script-link; do
		grep -Eq "^ok +$c " "$OUT/doctor-package.txt" || return 1
	done
}

test_package() {
	local name=t40-xenblkd-package specs seq domid loops old new cursor
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$name: install and upgrade of the package while a guest runs" || return
	if [[ ! -f ./debs/old.deb || ! -f ./debs/new.deb ]]; then
		fail "$name: packages" "no ./debs/old.deb and ./debs/new.deb on the control disk (make testbed-debs)"
		return
	fi
	old=$(deb_version ./debs/old.deb)
	new=$(deb_version ./debs/new.deb)
	check "$name: the new package's version $new sorts above $old" "dpkg --compare-versions" \
		dpkg --compare-versions "$new" gt "$old"

	mapfile -t specs < <(file_disks xenblkd 2)
	write_cfg "$name" reads "${specs[@]}"
	say "$name: a running guest with 2 disks while xenblkd $old is installed from its package, then upgraded to $new"
	create "$name"
	check "$name: xl create" "rc=$CREATE_RC: $(xl_errors "$name")" test "$CREATE_RC" = 0
	check "$name: vbds connected" "not Connected" wait_connected "$name" 2
	check "$name: guest reads its disks" "signature mismatch" guest_reads "$name" XBD-DISK-1 XBD-DISK-2
	domid=$(domid_of "$name")
	loops="$(losetup -nO NAME -j "$WORK/xenblkd-d1.img") $(losetup -nO NAME -j "$WORK/xenblkd-d2.img")"

	# Install: the package's unit (in /lib) replaces the suite's copy in /etc.
	seq=$(last_read_seq "$name")
	# The suite enabled its copy in /etc: the package enables its own.
	systemctl disable xenblkd.service >/dev/null 2>&1
	check "$name: dpkg -i $old" "$(tail -3 "$OUT/dpkg-install.log" 2>/dev/null | tr '\n' ' ')" \
		sh -c "timeout 300 dpkg -i ./debs/old.deb >'$OUT/dpkg-install.log' 2>&1"
	rm -f /etc/systemd/system/xenblkd.service
	systemctl daemon-reload
	check "$name: unit from the package, enabled and active" \
		"$(systemctl show -p FragmentPath,UnitFileState,ActiveState xenblkd | tr '\n' ' ')" \
		test "$(readlink -f "$(systemctl show -p FragmentPath --value xenblkd)") $(systemctl is-enabled xenblkd) $(systemctl is-active xenblkd)" = \
		"/usr/lib/systemd/system/xenblkd.service enabled active"
	check "$name: guest reads its disks after the install" "reads failed" \
		reads_after "$name" "${seq:-0}" XBD-DISK-1 XBD-DISK-2

	# Upgrade while the guest runs: postinst restarts the daemon, the fd store keeps the devices.
	local pid0 pid1
	pid0=$(systemctl show -p MainPID --value xenblkd)
	seq=$(last_read_seq "$name")
	check "$name: dpkg -i $new (upgrade)" "$(tail -3 "$OUT/dpkg-upgrade.log" 2>/dev/null | tr '\n' ' ')" \
		sh -c "timeout 300 dpkg -i ./debs/new.deb >'$OUT/dpkg-upgrade.log' 2>&1"
	pid1=$(systemctl show -p MainPID --value xenblkd)
	check "$name: $new installed and its daemon running (restarted: pid $pid0 -> $pid1)" \
		"version $(pkg_version), xenblkd version: $(xenblkd version 2>&1), $(systemctl is-active xenblkd)" \
		test "$(pkg_version) $(xenblkd version 2>&1) $(systemctl is-active xenblkd) $((pid0 != pid1))" = "$new xenblkd $new active 1"
	check "$name: guest still reads its disks after the upgrade" "reads failed" \
		reads_after "$name" "${seq:-0}" XBD-DISK-1 XBD-DISK-2
	check "$name: vbds still Connected after the upgrade" "states [$(vbd_states "$domid")]" \
		test "$(vbd_states "$domid")" = "4 4 "
	check "$name: the same loop devices after the upgrade" \
		"before [$loops], after [$(losetup -nO NAME -j "$WORK/xenblkd-d1.img") $(losetup -nO NAME -j "$WORK/xenblkd-d2.img")]" \
		test "$loops" = "$(losetup -nO NAME -j "$WORK/xenblkd-d1.img") $(losetup -nO NAME -j "$WORK/xenblkd-d2.img")"
	check "$name: dpkg --verify xenblkd (md5sums)" "$(dpkg --verify xenblkd 2>&1 | head -3 | tr '\n' ' ')" \
		verified

	check "$name: xenblkd doctor passes under the package" \
		"$(grep -E '^(FAIL|WARN)' "$OUT/doctor-package.txt" 2>/dev/null | head -3 | tr '\n' ' ')" doctor_ok

	# Removal while the guest uses the disks is refused, and changes nothing.
	timeout 300 dpkg -r xenblkd >"$OUT/dpkg-remove.log" 2>&1
	check "$name: dpkg -r refused while the guest uses xenblkd's disks" \
		"rc $?, $(pkg_version), $(systemctl is-active xenblkd): $(tail -2 "$OUT/dpkg-remove.log" | tr '\n' ' ')" \
		still_installed
	echo xenblkd install | dpkg --set-selections # undo dpkg -r's selection

	# journald priorities: a refused add is one warning; an attach is info.
	# The journal from here on: after its cursor (a --since in whole seconds could take earlier lines).
	cursor=$(journalctl -u xenblkd -n 1 --show-cursor -o cat 2>/dev/null | sed -n 's/^-- cursor: //p')
	timeout 120 xl block-attach "$name" "format=raw, vdev=xvdc, access=rw, script=xenblkd, target=$WORK/missing.img" \
		>"$OUT/xl-block-attach-missing.log" 2>&1
	# The daemon logged the refusal before answering the hotplug call; journald may store it a
	# little later: wait (bounded) for it before counting the lines.
	local deadline=$(($(now) + 30))
	until journalctl -u xenblkd --after-cursor "$cursor" -o cat 2>/dev/null | grep -q "msg=refused .*target=$WORK/missing.img" ||
		(($(now) >= deadline)); do
		sleep 0.5
	done
	journalctl -u xenblkd --after-cursor "$cursor" -o cat >"$OUT/journal-since-attach.txt" 2>&1
	journalctl -u xenblkd --after-cursor "$cursor" -p warning -o cat >"$OUT/journal-warning.txt" 2>&1
	check "$name: the refused add is one line at priority warning" \
		"$(grep -c 'msg=refused' "$OUT/journal-warning.txt") refused line(s) in journalctl -p warning: $(head -3 "$OUT/journal-warning.txt" | tr '\n' ' ')" \
		test "$(grep -c "msg=refused .*target=$WORK/missing.img" "$OUT/journal-warning.txt")" = 1
	check "$name: journalctl -p warning shows no info line" "$(grep -m1 'level=INFO' "$OUT/journal-warning.txt")" \
		no_info_lines
	journalctl -u xenblkd -p info --since "-10min" -o cat | grep 'msg=attached' | tail -2 | sed 's/^/   /'

	timeout 120 xl destroy "$name"
	check "$name: xl destroy afterwards frees everything" "leftovers" no_leftovers
	# The package stays installed for the groups after this one (same binary and unit).
}
group package test_package
