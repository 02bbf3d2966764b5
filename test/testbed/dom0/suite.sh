#!/bin/bash
# suite.sh: the end-to-end suite, run INSIDE the testbed's dom0 (as run-in-dom0.sh on the
# control disk; cwd = the control disk, $OUT = the directory copied back to the host).
#
# Every test runs with the stock `block` script and with xenblkd in the same boot. A check prints
# `PASS <name>` or `FAIL <name>: <why>` into $OUT/report.txt; the report ends with the timing
# table and a line `N passed, N failed`. Exit status 0 only if nothing failed.
#
# Mode (file ./mode on the control disk): `e2e` (default) = the whole suite; `demo` = one guest
# with 4 disks through the stock script, then through xenblkd, narrated, with the timing table.
#
# Under QEMU/TCG every process start in dom0 costs 0.1-0.5 s: every wait below is bounded by a
# wall-clock deadline ($EPOCHREALTIME), never by an iteration count, and every xl/xenstore call
# runs under `timeout`.
set -uo pipefail # no -e: a failed check is recorded and the suite goes on

SUITE_T0=$EPOCHREALTIME
UPTIME0=$(cut -d' ' -f1 /proc/uptime)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
REPORT=$OUT/report.txt
: >"$REPORT"
MODE=$(cat ./mode 2>/dev/null || echo e2e)
WORK=/var/lib/xenblkd-e2e
CONSOLE_DIR=/var/log/xen/console
XL=(timeout 300 xl -vvv -T)
exec > >(tee -a "$OUT/suite.log") 2>&1

# Only xenblkd's checks count towards `N passed, N failed`. The stock script's checks are the
# baseline: printed as `STOCK PASS|FAIL` and summed separately, because the stock script fails
# here for its own reasons (under a loaded host its serialised adds exceed libxl's fixed 40 s
# hotplug timeout), and that must not fail xenblkd's CI. CURRENT_SCRIPT says whose check it is.
passed=0
failed=0
stock_passed=0
stock_failed=0
CURRENT_SCRIPT=xenblkd
# report LINE: into the report, and onto the console so the host's serial.log shows progress.
report() {
	echo "$*" | tee -a "$REPORT"
	echo "xenblkd-e2e: $*" >/dev/console 2>/dev/null || true
}
pass() {
	if [[ $CURRENT_SCRIPT == block ]]; then
		stock_passed=$((stock_passed + 1)); report "STOCK PASS $1"
	else
		passed=$((passed + 1)); report "PASS $1"
	fi
}
fail() {
	if [[ $CURRENT_SCRIPT == block ]]; then
		stock_failed=$((stock_failed + 1)); report "STOCK FAIL $1: $2"
	else
		failed=$((failed + 1)); report "FAIL $1: $2"
	fi
	guest_crashes
}
# guest_crashes: after a failure, an INFO line for each guest whose console shows its kernel
# crashed (an oops or a panic), once per console log: a guest that died in the emulated CPU fails
# the checks that wait on it, and the report says so next to them. It does not retry anything.
declare -A CRASH_REPORTED=()
guest_crashes() {
	local log line
	for log in "$CONSOLE_DIR"/guest-*.log; do
		[[ -f $log && -z ${CRASH_REPORTED[$log]:-} ]] || continue
		line=$(grep -a -m1 -E 'Oops: |Kernel panic|BUG: |general protection fault' "$log" | tr -d '\r')
		[[ -n $line ]] || continue
		CRASH_REPORTED[$log]=1
		report "INFO the guest's kernel crashed: ${log##*/}: $line"
	done
}
# check NAME WHY COMMAND...: PASS if COMMAND succeeds, else FAIL with WHY.
check() {
	local name=$1 why=$2
	shift 2
	if "$@"; then pass "$name"; else fail "$name" "$why"; fi
}
say() {
	echo "== $*"
	echo "xenblkd-e2e: == $*" >/dev/console 2>/dev/null || true
	[[ $MODE == demo ]] && echo "   $*" >>"$OUT/narration.txt"
	return 0
}
now() { printf '%s\n' "${EPOCHREALTIME%.*}"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b - a}'; }

# ---------------------------------------------------------------------------------------------
# Setup: kernel modules, disk images with signatures, xenblkd installed from the control disk.

say "dom0 up after $(cut -d' ' -f1 /proc/uptime)s; $(xl info | awk '/^xen_version/{print "Xen " $3}'), kernel $(uname -r)"
# What this boot runs on: the release's versions head the report (docs/testbed.md quotes them).
report "INFO dom0: Debian $(cat /etc/debian_version), Xen $(xl info | awk '/^xen_version/{print $3}'), kernel $(uname -r), $(systemctl --version | head -1 | cut -d' ' -f1-2), libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon 2>/dev/null), $(ps -eo comm= | grep -m1 xenstored), virt_caps: $(xl info | sed -n 's/^virt_caps *: //p')"
modprobe loop
modprobe xen-blkback
mkdir -p "$WORK" "$CONSOLE_DIR"
# Each script gets its own images (<script>-d1.img ...): whatever one script leaves behind
# (a loop device still bound after a failure) must not make the other one refuse its disk.
for script in block xenblkd; do
	for i in 1 2 3 4; do
		truncate -s 64M "$WORK/$script-d$i.img"
		printf 'XBD-DISK-%s' "$i" | dd of="$WORK/$script-d$i.img" conv=notrunc status=none
	done
	truncate -s 64M "$WORK/$script-ro.img"
	printf 'XBD-SHARED-RO' | dd of="$WORK/$script-ro.img" conv=notrunc status=none
	truncate -s 64M "$WORK/$script-phy.img"
	printf 'XBD-PHY' | dd of="$WORK/$script-phy.img" conv=notrunc status=none
done

# A watchdog: if a test hangs, $OUT/watchdog.log shows where.
(while sleep 30; do
	{
		echo "--- $(date +%T) uptime=$(cut -d' ' -f1 /proc/uptime)"
		ps -eo pid,ppid,etime,stat,args --forest | grep -v '\['
		timeout 5 xl list
		losetup -a
	} >>"$OUT/watchdog.log" 2>&1
	sync
done) &
WATCHDOG=$!
trap 'kill $WATCHDOG 2>/dev/null' EXIT

# install_xenblkd: the binaries and unit come from the control disk (never baked into the image).
# Sets XENBLKD_MISSING to the reason when xenblkd cannot be used.
XENBLKD_MISSING=""
install_xenblkd() {
	if [[ ! -x ./xenblkd || ! -x ./xenblkd-hotplug ]]; then
		XENBLKD_MISSING="bin/xenblkd or bin/xenblkd-hotplug was not built (make build)"
		return
	fi
	if ! timeout 30 ./xenblkd --help >"$OUT/xenblkd-help.txt" 2>&1; then
		XENBLKD_MISSING="xenblkd --help failed: $(head -3 "$OUT/xenblkd-help.txt" | tr '\n' ' ')"
		return
	fi
	install -m 755 ./xenblkd /usr/sbin/xenblkd
	# The script libxl execs: the C entry (hands its errors over to /usr/sbin/xenblkd).
	rm -f /etc/xen/scripts/xenblkd
	install -m 755 ./xenblkd-hotplug /etc/xen/scripts/xenblkd
	install -m 644 ./xenblkd.service /etc/systemd/system/xenblkd.service
	# socket activation: the API socket systemd holds across daemon restarts.
	if [[ -f ./xenblkd.socket ]]; then
		install -m 644 ./xenblkd.socket /etc/systemd/system/xenblkd.socket
	fi
	systemctl daemon-reload
	systemctl enable xenblkd.service >/dev/null 2>&1
	if ! timeout 120 systemctl start xenblkd.service; then
		XENBLKD_MISSING="systemctl start xenblkd failed: $(systemctl status --no-pager -n 5 xenblkd 2>&1 | tail -5 | tr '\n' ' ')"
		return
	fi
	say "xenblkd installed (/usr/sbin/xenblkd, /etc/xen/scripts/xenblkd) and started: $(systemctl is-active xenblkd)"
}
install_xenblkd
if [[ -n $XENBLKD_MISSING ]]; then
	say "xenblkd unavailable: $XENBLKD_MISSING"
fi

# ---------------------------------------------------------------------------------------------
# Helpers. A guest is named after its test; $WORK/<name>.cfg is its xl config; its console is
# logged by xenconsoled to $CONSOLE_DIR/guest-<name>.log.

# write_cfg NAME HOLD DISK...: a 128 MiB PV guest with the given disk specs (xbd.disks=N tells
# its /init how many disks to wait for). HOLD: 0 = the guest powers off after reading its disks
# once; idle = it stays up, idle, until destroyed; reads = it stays up re-reading its disks every
# 2 s (DOMU-READ lines: reads_after), see image/domu-init.
write_cfg() {
	local name=$1 hold=$2 extra="console=hvc0 quiet xbd.disks=$(($# - 2))" spec disks=""
	shift 2
	case $hold in
	idle) extra="$extra xbd.idle" ;;
	reads) extra="$extra xbd.hold" ;;
	esac
	for spec in "$@"; do disks="$disks'$spec', "; done
	cat >"$WORK/$name.cfg" <<EOF
name = "$name"
type = "pv"
kernel = "/root/domu/vmlinux"
ramdisk = "/root/domu/initrd.gz"
extra = "$extra"
memory = 128
vcpus = 1
disk = [ ${disks%, } ]
on_poweroff = "destroy"
on_crash = "destroy"
EOF
}

# file_disks SCRIPT N: the specs of N file-backed disks d1..dN through SCRIPT.
file_disks() {
	local script=$1 n=$2 i letters=(a b c d)
	for ((i = 1; i <= n; i++)); do
		printf 'format=raw, vdev=xvd%s, access=rw, script=%s, target=%s/%s-d%s.img\n' \
			"${letters[i - 1]}" "$script" "$WORK" "$script" "$i"
	done
}

# hotplug_times LOG ACTION: "SPAN PER_DISK" of the hotplug scripts' ACTION (add or remove) in xl's
# -vvv LOG: the span from the first "forking to execute ... ACTION" to the last hotplug completion
# ("num_exec 1, not running hotplug scripts", which libxl logs for add and remove alike) in ms, and
# per disk each fork to its completion, paired in order: the median, or "median/max" with several
# disks. xl's lines are stamped in microseconds by ./xbd-ts (e2e.sh builds it); without it from
# xl -T's whole seconds. "n/a n/a" when the log has no such script run.
hotplug_times() {
	awk -v action="$2" '
		# t: the line time in seconds, from xbd-ts ($1) or else from xl -T ($2, HH:MM:SS).
		function t() {
			if ($1 ~ /^[0-9]+\.[0-9]+$/) return $1
			split($2, a, ":"); return a[1] * 3600 + a[2] * 60 + a[3]
		}
		BEGIN { nf = 0; nd = 0 } # numbers: an unset subscript would be ""
		$0 ~ ("forking to execute: .* " action) { fork[nf++] = t(); if (first == "") first = t() }
		/num_exec 1, not running hotplug scripts/ && nf > 0 { last = t(); if (nd < nf) d[nd] = (last - fork[nd]) * 1000; nd++ }
		END {
			if (first == "" || last == "") { print "n/a n/a"; exit }
			n = nd < nf ? nd : nf
			for (i = 1; i < n; i++) # insertion sort: mawk has no asort
				for (j = i; j > 0 && d[j - 1] > d[j]; j--) { x = d[j]; d[j] = d[j - 1]; d[j - 1] = x }
			med = n % 2 ? d[(n - 1) / 2] : (d[n / 2 - 1] + d[n / 2]) / 2
			if (n > 1) printf "%.0f %.0f/%.0f\n", (last - first) * 1000, med, d[n - 1]
			else printf "%.0f %.0f\n", (last - first) * 1000, med
		}' "$1"
}

# xl_logged LOG ARGS...: runs xl -vvv ARGS with its log in LOG, stamped by ./xbd-ts when there;
# sets XL_RC.
xl_logged() {
	local log=$1
	shift
	if [[ -x ./xbd-ts ]]; then
		"${XL[@]}" "$@" 2>&1 | ./xbd-ts >"$log"
		XL_RC=${PIPESTATUS[0]}
	else
		"${XL[@]}" "$@" >"$log" 2>&1
		XL_RC=$?
	fi
}

# create NAME: `xl create`; sets CREATE_RC, CREATE_S (wall time), SPAN_MS and ADD_MS (hotplug_times
# of its adds).
create() {
	local name=$1 t0=$EPOCHREALTIME
	local log="$OUT/xl-create-$name.log" # own line: one local expands every word before assigning
	xl_logged "$log" create "$WORK/$name.cfg"
	CREATE_RC=$XL_RC
	CREATE_S=$(elapsed "$t0")
	# The domain's id, from the log: it is gone already when xl create failed.
	local domid
	domid=$(grep -ao 'Domain [0-9]*:' "$log" | head -1 | tr -dc 0-9)
	[[ -n $domid ]] && TEST_DOMIDS+=("$domid")
	read -r SPAN_MS ADD_MS < <(hotplug_times "$log" add)
	echo "xl create $name: rc=$CREATE_RC wall=${CREATE_S}s hotplug_span=${SPAN_MS}ms add_per_disk=${ADD_MS}ms"
}

# create_parallel NAME...: `xl create` of every NAME at once: independent guests, and under TCG
# dom0's two vCPUs build two domains side by side. Sets CREATE_RCS[NAME] (their xl logs as
# create's) and adds their domids to TEST_DOMIDS. The stock script's guests are created one after
# the other: its adds serialise on its global lock, and libxl gives each only 40 s.
declare -A CREATE_RCS
create_parallel() {
	local name pids=() domid
	for name; do
		rm -f "$WORK/$name.rc"
		if [[ $CURRENT_SCRIPT == block ]]; then
			create "$name"
			echo "$CREATE_RC" >"$WORK/$name.rc"
			continue
		fi
		(create "$name"; echo "$CREATE_RC" >"$WORK/$name.rc") &
		pids+=($!)
	done
	((${#pids[@]} == 0)) || wait "${pids[@]}"
	for name; do
		CREATE_RCS[$name]=$(cat "$WORK/$name.rc" 2>/dev/null || echo "no rc")
		domid=$(grep -ao 'Domain [0-9]*:' "$OUT/xl-create-$name.log" | head -1 | tr -dc 0-9)
		[[ -n $domid ]] && TEST_DOMIDS+=("$domid")
	done
}

# destroy_all NAME...: `xl destroy` of every NAME at once (output to the suite log); the checks
# after it look at what is left.
destroy_all() {
	local name pids=()
	for name; do
		timeout 120 xl destroy "$name" >/dev/null 2>&1 &
		pids+=($!)
	done
	wait "${pids[@]}"
}

# destroy NAME: `xl destroy`, which runs the disks' remove scripts itself (not xl's daemonized
# child); sets DESTROY_RC, DESTROY_S (wall time) and REMOVE_MS (hotplug_times' per disk of its
# removes).
destroy() {
	local name=$1 t0=$EPOCHREALTIME span
	xl_logged "$OUT/xl-destroy-$name.log" destroy "$name"
	DESTROY_RC=$XL_RC
	DESTROY_S=$(elapsed "$t0")
	read -r span REMOVE_MS < <(hotplug_times "$OUT/xl-destroy-$name.log" remove)
	echo "xl destroy $name: rc=$DESTROY_RC wall=${DESTROY_S}s remove_span=${span}ms remove_per_disk=${REMOVE_MS}ms"
}

# xl_errors NAME: the first libxl errors of NAME's xl create, on one line.
xl_errors() { grep -a 'libxl: error' "$OUT/xl-create-$1.log" | head -3 | sed 's/.*libxl: error: //' | tr '\n' ' '; }

domid_of() { timeout 20 xl domid "$1" 2>/dev/null; }

# vbd_states DOMID: the state of every vbd backend of DOMID, space-separated, in one xenstore-ls
# (the waits poll it: under TCG each process start costs dom0 0.1-0.5 s of CPU).
vbd_states() {
	timeout 10 xenstore-ls -f "/local/domain/0/backend/vbd/$1" 2>/dev/null |
		awk -F' = ' '$1 ~ /\/backend\/vbd\/[0-9]+\/[0-9]+\/state$/ {gsub(/"/, "", $2); printf "%s ", $2}'
}

# wait_connected NAME N: every one of the N vbds of NAME reaches state 4 (Connected) within 150 s.
wait_connected() {
	local name=$1 n=$2 domid st deadline=$(($(now) + 150)) t0=$EPOCHREALTIME
	domid=$(domid_of "$name") || { echo "no domain $name"; return 1; }
	while (($(now) < deadline)); do
		st=$(vbd_states "$domid")
		if [[ $(wc -w <<<"$st") == "$n" && -z ${st//[4 ]/} ]]; then
			echo "$name: vbds [${st% }] connected ${t0:+$(elapsed "$t0")s after create returned}"
			return 0
		fi
		sleep 0.5
	done
	echo "$name: vbd states [${st% }] after 150 s"
	return 1
}

# guest_reads NAME SIG...: the guest's console shows, within 150 s, one DOMU-DISK line per disk
# in vdev order, with the given signatures.
guest_reads() {
	local name=$1 log=$CONSOLE_DIR/guest-$1.log deadline=$(($(now) + 150)) want got
	shift
	want=$(printf '%s ' "$@")
	while (($(now) < deadline)); do
		if grep -aq DOMU-DONE "$log" 2>/dev/null; then
			got=$(grep -a '^DOMU-DISK' "$log" | sed -n 's/.*sig=\([A-Za-z0-9-]*\).*/\1/p' | tr -d '\r' | tr '\n' ' ')
			grep -a DOMU- "$log" | sed "s/^/   [$name] /"
			[[ $got == "$want" ]] && return 0
			echo "$name read [${got% }], want [${want% }]"
			return 1
		fi
		sleep 1
	done
	echo "$name: no DOMU-DONE on its console within 150 s"
	return 1
}

# wait_gone NAME: the domain is gone within 150 s (guests without HOLD power off on their own);
# destroyed if it is not.
wait_gone() {
	local name=$1 deadline=$(($(now) + 150))
	while domid_of "$name" >/dev/null; do
		if (($(now) >= deadline)); then
			echo "$name still running after 150 s: destroying it"
			timeout 120 xl destroy "$name"
			return 1
		fi
		sleep 1
	done
}

# loops_on FILE: how many loop devices in dom0 are backed by FILE.
loops_on() { losetup -nO NAME -j "$1" 2>/dev/null | wc -l; }

# no_leftovers [EXCEPT_DEV]: within 60 s, no loop device is bound to one of the current script's
# images (except EXCEPT_DEV, a device the test made itself) and no vbd backend of the current
# test's domains (TEST_DOMIDS) is left in XenStore.
no_leftovers() {
	local except=${1:-NONE} deadline=$(($(now) + 60)) left backends d
	while :; do
		left=$(losetup -nO NAME,BACK-FILE -l 2>/dev/null | grep -F " $WORK/$CURRENT_SCRIPT-" | grep -v "^$except " || true)
		backends=""
		for d in "${TEST_DOMIDS[@]}"; do
			timeout 10 xenstore-list "backend/vbd/$d" >/dev/null 2>&1 && backends="$backends $d"
		done
		[[ -z $left && -z $backends ]] && return 0
		(($(now) >= deadline)) && break
		sleep 1
	done
	echo "left after teardown: loops [$(echo $left)] vbd backends of domains [${backends# }]"
	return 1
}

# clean_stock_leftovers: after a stock test, destroy what the test left and detach loop devices
# still bound to the stock images (inside this throw-away dom0), so the next test starts clean.
clean_stock_leftovers() {
	local name left
	for name in $(timeout 20 xl list | awk 'NR > 2 {print $1}'); do
		[[ $name == t*-block* ]] && timeout 120 xl destroy "$name" >/dev/null 2>&1
	done
	left=$(losetup -nO NAME,BACK-FILE -l 2>/dev/null | grep -F " $WORK/block-" | grep -v "^${1:-NONE} " | awk '{print $1}')
	if [[ -n $left ]]; then
		report "INFO the stock script left loop devices bound: $(echo $left); detaching them"
		for d in $left; do losetup -d "$d"; done
	fi
}

# xenblkd_ready NAME: false (and the check NAME fails) when xenblkd could not be installed.
xenblkd_ready() {
	[[ -z $XENBLKD_MISSING ]] && return 0
	fail "$1" "xenblkd unavailable: $XENBLKD_MISSING"
	return 1
}

declare -A TIME_CREATE TIME_SPAN TIME_ADD TIME_REMOVE
TEST_DOMIDS=()

# ---------------------------------------------------------------------------------------------
# Test 1 (+ the measurements of test 5): a PV guest with 1 and with 4 file-backed disks.
test_file_disks() { # SCRIPT N
	local script=$1 n=$2 name="t1-$1-$2d" sigs=() i specs
	CURRENT_SCRIPT=$script
	TEST_DOMIDS=()
	[[ $script == xenblkd ]] && ! xenblkd_ready "$name: guest with $n file disks" && return
	for ((i = 1; i <= n; i++)); do sigs+=("XBD-DISK-$i"); done
	mapfile -t specs < <(file_disks "$script" "$n")
	# HOLD=idle: the guest keeps running after it read its disks, so the vbds are still there to be
	# seen Connected however slowly this host polls (a guest that powers off by itself can be gone
	# before a loaded dom0 has looked); it is destroyed after the checks.
	write_cfg "$name" idle "${specs[@]}"
	say "$name: xl create of a PV guest with $n file-backed disk(s), script=$script"
	create "$name"
	TIME_CREATE[$script-$n]=$CREATE_S
	TIME_SPAN[$script-$n]=$SPAN_MS
	TIME_ADD[$script-$n]=$ADD_MS
	if ((CREATE_RC != 0)); then
		TIME_CREATE[$script-$n]="$CREATE_S(failed)"
		fail "$name: xl create" "rc=$CREATE_RC: $(xl_errors "$name")"
		timeout 120 xl destroy "$name" 2>/dev/null
		no_leftovers >/dev/null
		return
	fi
	pass "$name: xl create (${CREATE_S}s, hotplug span ${SPAN_MS} ms, add per disk ${ADD_MS} ms)"
	check "$name: all $n vbds reach state 4" "not all Connected" wait_connected "$name" "$n"
	check "$name: guest reads every disk's signature" "signature mismatch" guest_reads "$name" "${sigs[@]}"
	destroy "$name"
	TIME_REMOVE[$script-$n]=$REMOVE_MS
	((DESTROY_RC == 0)) || fail "$name: xl destroy" "rc=$DESTROY_RC"
	check "$name: teardown leaves no loop device and no backend" "leftovers" no_leftovers
}

# Test 2: a phy: disk on a loop device made by the test itself.
test_phy() { # SCRIPT
	local script=$1 name="t2-$1-phy" dev
	CURRENT_SCRIPT=$script
	TEST_DOMIDS=()
	[[ $script == xenblkd ]] && ! xenblkd_ready "$name: phy: disk" && return
	dev=$(losetup -f --show "$WORK/$script-phy.img") || { fail "$name: losetup" "no loop device"; return; }
	# idle: held up until destroyed, so the vbd is still there to be seen Connected (a guest that
	# powers off after reading can be gone before dom0 looks).
	write_cfg "$name" idle "backendtype=phy, format=raw, vdev=xvda, access=rw, script=$script, target=$dev"
	say "$name: xl create of a guest whose disk is $dev (phy), script=$script"
	create "$name"
	if ((CREATE_RC != 0)); then
		fail "$name: xl create" "rc=$CREATE_RC: $(xl_errors "$name")"
		timeout 120 xl destroy "$name" 2>/dev/null
		no_leftovers "$dev" >/dev/null
	else
		pass "$name: xl create (${CREATE_S}s)"
		check "$name: vbd reaches state 4" "not Connected" wait_connected "$name" 1
		check "$name: guest reads the phy disk's signature" "signature mismatch" guest_reads "$name" XBD-PHY
		timeout 120 xl destroy "$name"
		check "$name: teardown leaves the test's own $dev alone and nothing else" "leftovers" no_leftovers "$dev"
		check "$name: $dev still bound to its image" "the hotplug script detached a device it did not make" \
			test "$(losetup -nO BACK-FILE "$dev" 2>/dev/null)" = "$WORK/$script-phy.img"
	fi
	losetup -d "$dev" # our own device, by its path
}

# Test 3: two guests share one read-only image; a writable disk is not shared.
test_sharing() { # SCRIPT
	local script=$1 p="t3-$1" ro_spec rw_spec msg
	CURRENT_SCRIPT=$script
	TEST_DOMIDS=()
	[[ $script == xenblkd ]] && ! xenblkd_ready "$p: sharing" && return
	ro_spec="format=raw, vdev=xvda, access=ro, script=$script, target=$WORK/$script-ro.img"
	write_cfg "$p-ro-a" idle "$ro_spec"
	write_cfg "$p-ro-b" idle "$ro_spec"
	rw_spec="format=raw, vdev=xvda, access=rw, script=$script, target=$WORK/$script-d1.img"
	write_cfg "$p-rw-a" idle "$rw_spec"
	write_cfg "$p-rw-b" idle "$rw_spec"
	say "$p: two guests share $WORK/$script-ro.img read-only, a third has d1.img writable (created at once), script=$script"
	create_parallel "$p-ro-a" "$p-ro-b" "$p-rw-a"
	check "$p: first read-only guest created" "rc=${CREATE_RCS[$p-ro-a]}" test "${CREATE_RCS[$p-ro-a]}" = 0
	check "$p: second read-only guest created" "rc=${CREATE_RCS[$p-ro-b]}" test "${CREATE_RCS[$p-ro-b]}" = 0
	check "$p: writable guest created" "rc=${CREATE_RCS[$p-rw-a]}" test "${CREATE_RCS[$p-rw-a]}" = 0
	check "$p: first guest connected" "not Connected" wait_connected "$p-ro-a" 1
	check "$p: second guest connected" "not Connected" wait_connected "$p-ro-b" 1
	check "$p: first guest reads the shared disk" "signature mismatch" guest_reads "$p-ro-a" XBD-SHARED-RO
	check "$p: second guest reads the shared disk" "signature mismatch" guest_reads "$p-ro-b" XBD-SHARED-RO
	local loops
	loops=$(loops_on "$WORK/$script-ro.img")
	say "$p: loop devices on ro.img with two read-only guests: $loops"
	if [[ $script == xenblkd ]]; then
		check "$p: one loop device for the shared read-only image" "found $loops" test "$loops" = 1
	else
		report "INFO $p: the stock script uses $loops loop device(s) for the shared image"
	fi

	say "$p: a guest has d1.img writable; a second guest asks for it too"
	create "$p-rw-b"
	check "$p: second guest for the writable disk is refused (xl create fails)" "xl create rc=$CREATE_RC" \
		test "$CREATE_RC" != 0
	# libxl logs the script's hotplug-error as "... script: <message>".
	msg=$(grep -a 'libxl.*error.*script: ' "$OUT/xl-create-$p-rw-b.log" | sed 's/.*script: //' | head -1)
	say "$p: the refusal as xl reports it: ${msg:-<none>}"
	if [[ $script == xenblkd ]]; then
		check "$p: xl create fails with xenblkd's message" "no hotplug-error message in the xl log" \
			test -n "$msg"
		check "$p: the message is xenblkd's and names the image" "got [$msg]" \
			eval '[[ $msg == *d1.img* ]] && ! grep -q "is mounted" <<<"$msg"'
	else
		report "INFO $p: stock script's message: ${msg:-<none>}"
	fi
	check "$p: refused guest left nothing behind (one loop on d1.img)" "loops on d1.img: $(loops_on "$WORK/$script-d1.img")" \
		test "$(loops_on "$WORK/$script-d1.img")" = 1
	check "$p: writable guest still reads its disk" "signature mismatch" guest_reads "$p-rw-a" XBD-DISK-1
	destroy_all "$p-ro-a" "$p-ro-b" "$p-rw-a" "$p-rw-b"
	check "$p: teardown leaves no loop device and no backend" "leftovers" no_leftovers
}

# reads_after NAME SEQ SIG...: within 30 s the guest prints a DOMU-READ round newer than SEQ
# with the expected signatures (it re-reads its disks every 2 s with caches dropped).
reads_after() {
	local name=$1 seq0=$2 log=$CONSOLE_DIR/guest-$1.log deadline=$(($(now) + 30)) want got last
	shift 2
	want=$(printf '%s ' "$@")
	while (($(now) < deadline)); do
		last=$(grep -a '^DOMU-READ' "$log" | tail -1 | sed -n 's/.*seq=\([0-9]*\).*/\1/p')
		if [[ -n $last ]] && ((last > seq0 + 1)); then
			got=$(grep -a "^DOMU-READ seq=$((last - 1)) " "$log" | sed -n 's/.*sig=\([A-Za-z0-9-]*\).*/\1/p' | tr -d '\r' | tr '\n' ' ')
			[[ $got == "$want" ]] && return 0
			# A round printed wholly or partly to another console log (a migration or save
			# suspended the guest before or between its reads: the rest went to the incoming
			# domain's log) has fewer reads here than wanted: wait for the next round in this one.
			# A full round that read other signatures is a failure.
			if (($(wc -w <<<"$got") >= $#)); then
				echo "$name read [${got% }] in round $((last - 1)), want [${want% }]"
				return 1
			fi
		fi
		sleep 1
	done
	echo "$name: no new DOMU-READ round within 30 s"
	return 1
}
last_read_seq() { grep -a '^DOMU-READ' "$CONSOLE_DIR/guest-$1.log" | tail -1 | sed -n 's/.*seq=\([0-9]*\).*/\1/p'; }

# restarted_after PID: within 60 s systemd runs a new xenblkd (MainPID neither PID nor 0) and the
# unit is active again (Type=notify: the new daemon said READY=1). Right after a kill the unit can
# still show the old pid as active, so the pid is what is waited for.
restarted_after() {
	local old=$1 deadline=$(($(now) + 60)) cur
	while (($(now) < deadline)); do
		cur=$(systemctl show -p MainPID --value xenblkd)
		[[ $cur != "$old" && $cur != 0 ]] && systemctl is-active -q xenblkd && return 0
		sleep 0.5
	done
	return 1
}

# Test 4: the daemon restarts or dies while guests run (xenblkd only: the stock script has no
# daemon, so it has nothing to compare here).
test_daemon_restart() {
	local name=t4-xenblkd-restart specs pid seq domid
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$name: guests survive daemon restart and kill -9" || return
	mapfile -t specs < <(file_disks xenblkd 2)
	write_cfg "$name" reads "${specs[@]}"
	say "$name: a running guest with 2 disks while xenblkd is restarted, then killed with SIGKILL"
	create "$name"
	check "$name: xl create" "rc=$CREATE_RC" test "$CREATE_RC" = 0
	check "$name: vbds connected" "not Connected" wait_connected "$name" 2
	check "$name: guest reads its disks" "signature mismatch" guest_reads "$name" XBD-DISK-1 XBD-DISK-2
	domid=$(domid_of "$name")

	seq=$(last_read_seq "$name")
	timeout 120 systemctl restart xenblkd.service
	check "$name: xenblkd active after systemctl restart" "$(systemctl is-active xenblkd)" \
		systemctl is-active -q xenblkd
	check "$name: guest still reads its disks after the restart" "reads failed" \
		reads_after "$name" "${seq:-0}" XBD-DISK-1 XBD-DISK-2
	check "$name: vbds still Connected after the restart" "states [$(vbd_states "$domid")]" \
		test "$(vbd_states "$domid")" = "4 4 "
	check "$name: both loop devices kept over the restart" "loops on d1/d2: $(loops_on "$WORK/xenblkd-d1.img")/$(loops_on "$WORK/xenblkd-d2.img")" \
		test "$(loops_on "$WORK/xenblkd-d1.img")$(loops_on "$WORK/xenblkd-d2.img")" = 11

	pid=$(systemctl show -p MainPID --value xenblkd)
	seq=$(last_read_seq "$name")
	say "$name: kill -9 of xenblkd (pid $pid)"
	[[ -n $pid && $pid != 0 ]] && kill -9 "$pid"
	check "$name: systemd restarts xenblkd after kill -9" "MainPID $(systemctl show -p MainPID --value xenblkd), $(systemctl is-active xenblkd)" \
		restarted_after "$pid"
	systemctl is-active -q xenblkd || timeout 120 systemctl start xenblkd # for the groups after this one
	check "$name: guest still reads its disks after kill -9" "reads failed" \
		reads_after "$name" "${seq:-0}" XBD-DISK-1 XBD-DISK-2
	check "$name: vbds still Connected after kill -9" "states [$(vbd_states "$domid")]" \
		test "$(vbd_states "$domid")" = "4 4 "
	timeout 120 xl destroy "$name"
	check "$name: xl destroy afterwards frees everything" "leftovers" no_leftovers
}

# ratio A B: B/A to two decimals, or n/a.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a+0 > 0 && b != "" && b != "n/a") printf "%.2f", b/a; else print "n/a" }'; }

timing_table() {
	local n f='%-5s | %-10s %-10s %-6s | %-10s %-10s %-6s | %-12s %-12s %-6s | %-12s %-12s %-6s'
	report ""
	report "Timing (QEMU TCG, -cpu Nehalem, Xen on $(xl info | awk '/^nr_cpus/{print $3}') CPU(s); emulation numbers: compare columns, not with bare metal)"
	report "$(printf "$f" disks 'create s' 'create s' ratio 'span ms' 'span ms' ratio \
		'add/disk ms' 'add/disk ms' ratio 'rm/disk ms' 'rm/disk ms' ratio)"
	report "$(printf "$f" '' stock xenblkd '' stock xenblkd '' stock xenblkd '' stock xenblkd '')"
	for n in 1 4; do
		[[ -z ${TIME_CREATE[block-$n]:-}${TIME_CREATE[xenblkd-$n]:-} ]] && continue # not run (demo)
		local cs=${TIME_CREATE[block-$n]:-n/a} cx=${TIME_CREATE[xenblkd-$n]:-n/a}
		local ss=${TIME_SPAN[block-$n]:-n/a} sx=${TIME_SPAN[xenblkd-$n]:-n/a}
		local as=${TIME_ADD[block-$n]:-n/a} ax=${TIME_ADD[xenblkd-$n]:-n/a}
		local rs=${TIME_REMOVE[block-$n]:-n/a} rx=${TIME_REMOVE[xenblkd-$n]:-n/a}
		report "$(printf "$f" "$n" "$cs" "$cx" "$(ratio "$cs" "$cx")" "$ss" "$sx" "$(ratio "$ss" "$sx")" \
			"$as" "$ax" "$(ratio "${as%%/*}" "${ax%%/*}")" "$rs" "$rx" "$(ratio "${rs%%/*}" "${rx%%/*}")")"
	done
	report "(create = xl create wall time, (failed) = xl create failed; span = first hotplug 'add' fork to last hotplug completion in"
	report " the xl -vvv log; add/disk and rm/disk = each add's (xl create) or remove's (xl destroy) fork to its completion,"
	report " median (median/max with 4 disks), as libxl sees it; xl's lines stamped in µs by xbd-ts"
	report " ($([[ -x ./xbd-ts ]] && echo present || echo 'MISSING: whole seconds')); ratio = xenblkd/stock.)"
}

# Test groups, run in this order. Each file in tests.d/ on the control disk (copied from
# test/testbed/dom0/tests.d/ by e2e.sh, sourced in name order) defines its tests with the helpers
# above and registers them with `group NAME FUNCTION`. The file ./only on the control disk (from
# XENBLKD_E2E_ONLY on the host) is an extended regex: only the groups whose whole name matches run.
GROUP_NAMES=()
declare -A GROUP_FN
group() { GROUP_NAMES+=("$1"); GROUP_FN[$1]=$2; }

run_file_disks() {
	for script in block xenblkd; do
		test_file_disks "$script" 1
		test_file_disks "$script" 4
	done
	clean_stock_leftovers
}
# The stock script's phy: disk is not run: it prints no comparison and shows no stock bug (the
# stock block only checks and passes a phy: device through).
run_phy() { test_phy xenblkd; }
run_sharing() {
	for script in block xenblkd; do test_sharing "$script"; done
	clean_stock_leftovers
}
group file-disks run_file_disks
group phy run_phy
group sharing run_sharing
group daemon-restart test_daemon_restart
for f in ./tests.d/*.sh; do
	[[ -e $f ]] || continue
	# shellcheck source=/dev/null
	. "$f"
done

GROUP_TIMES=() # the demo runs no groups
if [[ $MODE == demo ]]; then
	test_file_disks block 4
	clean_stock_leftovers
	test_file_disks xenblkd 4
else
	ONLY=$(cat ./only 2>/dev/null || true)
	for g in "${GROUP_NAMES[@]}"; do
		if [[ -n $ONLY ]] && ! [[ $g =~ ^($ONLY)$ ]]; then
			report "SKIP group $g (XENBLKD_E2E_ONLY=$ONLY)"
			continue
		fi
		say "group $g"
		g0=$EPOCHREALTIME
		"${GROUP_FN[$g]}"
		GROUP_TIMES+=("$(printf '%-16s %7s s' "$g" "$(elapsed "$g0")")")
	done
fi
timing_table
if ((${#GROUP_TIMES[@]})); then
	report ""
	report "Group times (wall, in dom0; the suite so far $(elapsed "$SUITE_T0") s, setup included; dom0 was up ${UPTIME0} s when it started):"
	for line in "${GROUP_TIMES[@]}"; do report "  $line"; done
fi

segv=$(dmesg | grep -aE 'segfault|general protection' | head -5)
[[ -n $segv ]] && report "NOTE dom0 dmesg shows faults (TCG emulation glitch?): $segv"
cp /var/log/xen/console/*.log "$OUT/" 2>/dev/null
# The background xl of each guest logs its teardown (hotplug removes) here.
cp /var/log/xen/xl-*.log "$OUT/" 2>/dev/null
journalctl -b -u xenblkd --no-pager >"$OUT/xenblkd-journal.log" 2>&1
report "stock block script (baseline, not counted): $stock_passed passed, $stock_failed failed"
report "$passed passed, $failed failed"
((failed == 0))
