#!/usr/bin/env bash
# e2e.sh: the end-to-end suite on real Xen (or, with --demo, the demo), from the host.
#
#   test/testbed/e2e.sh           build/reuse each release's image, boot each once (side by side),
#                                 run dom0/suite.sh in each
#   test/testbed/e2e.sh --demo    one boot (XENBLKD_TESTBED_RELEASE, default bookworm), one 4-disk
#                                 guest: stock script, then xenblkd
#   test/testbed/e2e.sh --images  only build (or find in the cache) every release's image, side by
#                                 side; `make test` runs it beside the unit stage
#
# XENBLKD_TESTBED_RELEASES (default: every releases/*.conf, oldest first: bookworm trixie) are the
# Debian releases the suite runs on, one boot each, side by side (XENBLKD_TESTBED_SERIAL=1: one
# after the other); their images are built (or found in the cache) side by side before the boots.
# Puts bin/xenblkd and bin/xenblkd-hotplug (if built), the unit (dist/xenblkd.service, else the
# testbed's fallback unit) and the packages of `make testbed-debs` (if built) on the control disk
# with dom0/suite.sh, boots with run.sh, prints each release's report (its timing tables
# included) once every boot is over. The last line is always `N passed, N failed` over every
# release (CI reads it); exit status non-zero on any failure.
# Results: $XENBLKD_TESTBED_RESULTS (default build/testbed/<timestamp>-<mode>) in the checkout,
# one directory per release.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

mode=e2e
[[ ${1:-} == --demo ]] && mode=demo
[[ ${1:-} == --images ]] && mode=images
repo=$(cd "$TESTBED_DIR/../.." && pwd)
res=${XENBLKD_TESTBED_RESULTS:-$repo/build/testbed/$(date +%Y%m%d-%H%M%S)-$mode}
mkdir -p "$res"

# cannot_run REASON: the testbed cannot run on this machine; say why, in the CI line format.
cannot_run() {
	echo "testbed cannot run here: $1" >&2
	echo "0 passed, 1 failed"
	exit 1
}
command -v qemu-system-x86_64 >/dev/null || cannot_run "qemu-system-x86_64 not installed (scripts/setup.sh testbed installs it)"
[[ $(id -u) == 0 ]] || cannot_run "must run as root (debootstrap, chroot)"
[[ $(uname -m) == x86_64 ]] || cannot_run "needs an x86_64 host (QEMU TCG emulates the same CPU family)"

if [[ $mode == demo ]]; then
	releases=("$TESTBED_RELEASE")
else
	read -ra releases <<<"${XENBLKD_TESTBED_RELEASES:-$(testbed_releases | tr '\n' ' ')}"
fi
for rel in "${releases[@]}"; do
	TESTBED_RELEASE=$rel check_release
done

# The images first, side by side (debootstrap waits on the network and the disk, not the CPU);
# each build logs to its release's result directory.
t0=$EPOCHREALTIME
declare -A build_pid
for rel in "${releases[@]}"; do
	mkdir -p "$res/$rel"
	XENBLKD_TESTBED_RELEASE=$rel "$TESTBED_DIR/build-image.sh" >/dev/null 2>"$res/$rel/build-image.log" &
	build_pid[$rel]=$!
done
build_failed=""
for rel in "${releases[@]}"; do
	if wait "${build_pid[$rel]}"; then
		log "$rel image ready after $(seconds_since "$t0")s: $(TESTBED_RELEASE=$rel image_dir)"
	else
		cat "$res/$rel/build-image.log" >&2
		build_failed="$build_failed $rel"
	fi
done
[[ -z $build_failed ]] || cannot_run "building the testbed image failed for:$build_failed (see above)"
[[ $mode == images ]] && exit 0

ctl=$(mktemp -d)
trap 'rm -rf "$ctl"' EXIT
install -m 755 "$TESTBED_DIR/dom0/suite.sh" "$ctl/run-in-dom0.sh"
# xbd-ts timestamps xl's log lines in microseconds (xl -T has whole seconds): the hotplug span
# and per-disk add latency in the timing table. Without gcc the table falls back to seconds.
if ! gcc -static -O2 -Wall -Wextra -Werror -std=c11 -o "$ctl/xbd-ts" "$TESTBED_DIR/dom0/xbd-ts.c"; then
	log "gcc could not build dom0/xbd-ts.c: hotplug timings in whole seconds only"
fi
mkdir -p "$ctl/tests.d"
for f in "$TESTBED_DIR"/dom0/tests.d/*.sh; do
	[[ -e $f ]] && install -m 644 "$f" "$ctl/tests.d/"
done
# XENBLKD_E2E_ONLY: an extended regex of test group names to run (all when unset).
[[ -n ${XENBLKD_E2E_ONLY:-} ]] && printf '%s\n' "$XENBLKD_E2E_ONLY" >"$ctl/only"
echo "$mode" >"$ctl/mode"
if [[ -x $repo/bin/xenblkd ]]; then
	install -m 755 "$repo/bin/xenblkd" "$ctl/xenblkd"
else
	log "bin/xenblkd missing (make build): its checks will fail"
fi
if [[ -x $repo/bin/xenblkd-hotplug ]]; then
	install -m 755 "$repo/bin/xenblkd-hotplug" "$ctl/xenblkd-hotplug"
else
	log "bin/xenblkd-hotplug missing (make build): its checks will fail"
fi
if [[ -f $repo/dist/xenblkd.socket ]]; then
	install -m 644 "$repo/dist/xenblkd.socket" "$ctl/xenblkd.socket"
fi
# The packages of `make testbed-debs` (make test-e2e builds them), for the package group.
for v in old new; do
	for deb in "$repo"/build/testbed-debs/$v/xenblkd_*_amd64.deb; do
		[[ -f $deb ]] || continue
		mkdir -p "$ctl/debs"
		install -m 644 "$deb" "$ctl/debs/$v.deb"
		log "package ($v): $(basename "$deb")"
	done
done
if [[ -f $repo/dist/xenblkd.service ]]; then
	install -m 644 "$repo/dist/xenblkd.service" "$ctl/xenblkd.service"
else
	log "dist/xenblkd.service missing: using the testbed's fallback unit"
	install -m 644 "$TESTBED_DIR/xenblkd.service" "$ctl/xenblkd.service"
fi

# One e2e.sh run at a time on this machine: its releases already boot side by side and keep both
# cores busy; a third and fourth QEMU would slow every guest past the suite's waits. A second run
# waits here.
mkdir -p "$TESTBED_CACHE"
exec 8>"$TESTBED_CACHE/.run-lock"
if ! flock -n 8; then
	log "another testbed run holds $TESTBED_CACHE/.run-lock; waiting for it"
	flock -w 5400 8 || cannot_run "another testbed run held $TESTBED_CACHE/.run-lock for 90 min"
fi

# run_release REL: one boot of REL's image, its report on stdout with a header line, and its own
# `N passed, N failed` (a failure line when the suite did not get to write one).
run_release() {
	local rel=$1 r=$res/$1 t1=$EPOCHREALTIME why REL_RC=0
	XENBLKD_TESTBED_RELEASE=$rel "$TESTBED_DIR/run.sh" "$ctl" "$r" || REL_RC=$?
	log "$rel: boot + $mode + poweroff: $(seconds_since "$t1")s; results in $r"
	grep -h . "$r/qemu.txt" >&2 || true
	echo "=== $rel"
	if [[ $mode == demo && -f $r/out/narration.txt ]]; then
		echo "What happened in dom0:"
		cat "$r/out/narration.txt"
		echo
	fi
	if [[ -f $r/out/report.txt ]]; then
		cat "$r/out/report.txt"
		# The report's last line is the summary unless the suite died before writing it.
		tail -1 "$r/out/report.txt" | grep -Eq '^[0-9]+ passed, [0-9]+ failed$' && return
		echo "FAIL $rel suite: dom0 script stopped early (rc=$REL_RC; see $r/out/suite.log)"
	else
		case $REL_RC in
		124) why="deadline hit" ;;
		125) why="dom0 never came up (2 boots; see $r/serial*.log)" ;;
		*) why="no report (rc=$REL_RC)" ;;
		esac
		echo "FAIL $rel testbed: $why"
	fi
	echo "0 passed, 1 failed"
}

# The releases boot side by side, each QEMU with one vCPU (XENBLKD_TESTBED_SERIAL=1: one after
# the other, two vCPUs each). Alone, a QEMU with two vCPUs keeps only 163-168 % of its 200 % busy
# (dom0 often waits on one busy guest vCPU); two of them side by side put 4 vCPU threads on the 2
# cores and every guest ran more than twice as slowly (Xen's vCPUs wait on each other's descheduled
# threads). Two one-vCPU QEMUs fill both cores with no such waits: file-disks + phy + sharing on
# both releases took 363 s side by side against 414 s one after the other (docs/testbed.md).
# QEMU_SMP still overrides. Each release's report is printed whole, in release order, once every
# boot is over.
side_by_side=0
if ((${#releases[@]} > 1)) && [[ ${XENBLKD_TESTBED_SERIAL:-0} != 1 ]]; then
	side_by_side=1
	export QEMU_SMP=${QEMU_SMP:-1}
fi
declare -A rel_t0 rel_wall rel_pid
for rel in "${releases[@]}"; do
	rel_t0[$rel]=$EPOCHREALTIME
	if ((side_by_side == 0)); then
		run_release "$rel" >"$res/$rel/e2e-report.txt"
		rel_wall[$rel]=$(seconds_since "${rel_t0[$rel]}")
	else
		(
			run_release "$rel" >"$res/$rel/e2e-report.txt"
			seconds_since "${rel_t0[$rel]}" >"$res/$rel/wall.txt"
		) &
		rel_pid[$rel]=$!
	fi
done
for rel in "${releases[@]}"; do
	[[ -n ${rel_pid[$rel]:-} ]] || continue
	wait "${rel_pid[$rel]}" || true
	rel_wall[$rel]=$(cat "$res/$rel/wall.txt" 2>/dev/null || echo 0)
done

total_passed=0
total_failed=0
rc=0
summary=()
for rel in "${releases[@]}"; do
	cat "$res/$rel/e2e-report.txt"
	line=$(tail -1 "$res/$rel/e2e-report.txt")
	if ! [[ $line =~ ^[0-9]+\ passed,\ [0-9]+\ failed$ ]]; then
		echo "FAIL $rel testbed: no summary line (see $res/$rel)"
		line="0 passed, 1 failed"
	fi
	p=${line%% passed*}
	f=${line#*passed, }
	f=${f%% failed*}
	total_passed=$((total_passed + p))
	total_failed=$((total_failed + f))
	((f == 0)) || rc=1
	summary+=("$(printf '%-9s %4d passed %3d failed  %6.0f s  (boot to runner %s s; QEMU CPU %s)' "$rel" "$p" "$f" \
		"${rel_wall[$rel]}" "$(sed -n 's/^dom0_runner_start_s=//p' "$res/$rel/qemu.txt" 2>/dev/null | tail -1)" \
		"$(awk -F= '$1 == "qemu_wall_s" {w = $2} $1 == "qemu_cpu_s" {c = $2}
			END {if (w > 0 && c != "") printf "%d s, %.0f %% of its wall time", c, 100 * c / w; else print "n/a"}' \
			"$res/$rel/qemu.txt" 2>/dev/null)")")
done
echo
echo "Suite per release ($( ((side_by_side)) && echo "side by side, ${QEMU_SMP} vCPU each" || echo 'one after the other'); wall time: boot + suite + poweroff; total with image builds $(seconds_since "$t0") s):"
printf '%s\n' "${summary[@]}"
echo "$total_passed passed, $total_failed failed"
exit "$rc"
