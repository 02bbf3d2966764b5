#!/usr/bin/env bash
# e2e.sh: the end-to-end suite on real Xen (or, with --demo, the demo), from the host.
#
#   test/testbed/e2e.sh           build/reuse the image, boot it once, run dom0/suite.sh
#   test/testbed/e2e.sh --demo    the same boot, one 4-disk guest: stock script, then xenblkd
#
# Puts bin/xenblkd and bin/xenblkd-hotplug (if built), the unit (dist/xenblkd.service, else the testbed's fallback
# unit) and the packages of `make testbed-debs` (if built) on the control disk with dom0/suite.sh, boots with run.sh, prints dom0's report. The last
# line is always `N passed, N failed` (CI reads it); exit status non-zero on any failure.
# Results: $XENBLKD_TESTBED_RESULTS (default build/testbed/<timestamp>) in the checkout.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

mode=e2e
[[ ${1:-} == --demo ]] && mode=demo
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

t0=$EPOCHREALTIME
"$TESTBED_DIR/build-image.sh" >/dev/null || cannot_run "building the testbed image failed (see above)"
log "image ready after $(seconds_since "$t0")s: $(image_dir)"

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

# One testbed run at a time on this machine: two QEMU/TCG guests on 2 cores would both miss
# libxl's 40 s hotplug deadline. A second run waits here.
mkdir -p "$TESTBED_CACHE"
exec 8>"$TESTBED_CACHE/.run-lock"
if ! flock -n 8; then
	log "another testbed run holds $TESTBED_CACHE/.run-lock; waiting for it"
	flock -w 5400 8 || cannot_run "another testbed run held $TESTBED_CACHE/.run-lock for 90 min"
fi

t1=$EPOCHREALTIME
rc=0
"$TESTBED_DIR/run.sh" "$ctl" "$res" || rc=$?
log "boot + $mode + poweroff: $(seconds_since "$t1")s (total $(seconds_since "$t0")s); results in $res"
grep -h . "$res/qemu.txt" >&2 || true

if [[ $mode == demo && -f $res/out/narration.txt ]]; then
	echo "What happened in dom0:"
	cat "$res/out/narration.txt"
	echo
fi
if [[ -f $res/out/report.txt ]]; then
	cat "$res/out/report.txt"
	# The report's last line is the summary unless the suite died before writing it.
	tail -1 "$res/out/report.txt" | grep -Eq '^[0-9]+ passed, [0-9]+ failed$' ||
		{ echo "FAIL suite: dom0 script stopped early (rc=$rc; see $res/out/suite.log)"; echo "0 passed, 1 failed"; }
else
	case $rc in
	124) why="deadline hit" ;;
	125) why="dom0 never came up (2 boots; see $res/serial*.log)" ;;
	*) why="no report (rc=$rc)" ;;
	esac
	echo "FAIL testbed: $why"
	echo "0 passed, 1 failed"
	exit 1
fi
exit "$rc"
