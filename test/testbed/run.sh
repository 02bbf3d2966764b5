#!/usr/bin/env bash
# run.sh: boot the cached testbed image under QEMU/TCG, run a script inside dom0, copy its
# results back, power off -- always within a deadline.
#
#   test/testbed/run.sh CTL_DIR RESULT_DIR   batch: CTL_DIR must hold an executable
#                                            run-in-dom0.sh; its files go on the control disk
#   test/testbed/run.sh --interactive        the same boot on this terminal (Ctrl-A X quits)
#
# Batch mode: dom0's xenblkd-testbed-runner runs run-in-dom0.sh from the control disk (cwd = the
# disk, $OUT = its out/ directory), then powers off. RESULT_DIR gets serial.log (Xen + dom0
# console, host timestamps), out/ (log, rc, whatever the script wrote) and qemu.txt.
# Exit status: the script's, or 124 = run deadline hit, 125 = dom0 never came up (twice).
#
# Env: XENBLKD_TESTBED_BOOT_DEADLINE (s, default 600): dom0 must start the runner by then, else
#      QEMU is killed and the boot retried once; XENBLKD_TESTBED_RUN_DEADLINE (s, default 4500):
#      the whole run (2117 s at the slowest measured, on the AMD EPYC machine); XENBLKD_TESTBED_RELEASE (default bookworm): whose image boots;
#      QEMU_CPU (default Nehalem), QEMU_MEM (MiB, 2048), QEMU_SMP (2; e2e.sh boots several releases side by side with 1).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BOOT_DEADLINE=${XENBLKD_TESTBED_BOOT_DEADLINE:-600}
RUN_DEADLINE=${XENBLKD_TESTBED_RUN_DEADLINE:-4500}
# -cpu max is ~1.4x faster, but glibc's AVX2 string functions crash at random under QEMU 7.2
# TCG; Nehalem (SSE4.2, no AVX) ran clean. See docs/testbed.md.
QEMU_CPU=${QEMU_CPU:-Nehalem}
# smap=0: QEMU 7.2 TCG's SMAP handling crashes Xen's PV dom0 on its first bounce frame.
XEN_ARGS="console=com1 com1=115200 dom0_mem=1024M,max:1024M dom0_max_vcpus=${QEMU_SMP:-2} bootscrub=0 smap=0 loglvl=all guest_loglvl=all"
# QEMU's multiboot module list is comma-separated: no commas in here.
DOM0_ARGS="root=/dev/vda ro console=hvc0 quiet systemd.show_status=1"

check_release
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run scripts/setup.sh testbed"
img=$(image_dir)
[[ -f $img/complete ]] || die "no testbed image for this recipe in $img: run test/testbed/build-image.sh"

qemu_args=(
	-accel tcg,thread=multi -cpu "$QEMU_CPU" -m "${QEMU_MEM:-2048}" -smp "${QEMU_SMP:-2}"
	-no-reboot -nic none
	-kernel "$img/xen" -append "$XEN_ARGS"
	-initrd "$img/vmlinuz $DOM0_ARGS,$img/initrd.img"
	-drive "file=$img/rootfs.img,if=virtio,format=raw,snapshot=on"
)

if [[ ${1:-} == --interactive ]]; then
	exec qemu-system-x86_64 "${qemu_args[@]}" -nographic -serial mon:stdio
fi

ctl_dir=${1:?usage: run.sh CTL_DIR RESULT_DIR | run.sh --interactive}
res=${2:?usage: run.sh CTL_DIR RESULT_DIR}
[[ -x $ctl_dir/run-in-dom0.sh ]] || die "$ctl_dir/run-in-dom0.sh missing or not executable"
mkdir -p "$res"
res=$(cd "$res" && pwd)

qemu_pid=""
# stop_qemu kills our QEMU (by its pid, never by name) and waits for it.
stop_qemu() {
	[[ -n $qemu_pid ]] || return 0
	if kill -0 "$qemu_pid" 2>/dev/null; then
		kill "$qemu_pid" 2>/dev/null || true
		for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.5; done
		kill -9 "$qemu_pid" 2>/dev/null || true
	fi
	wait "$qemu_pid" 2>/dev/null || true
	qemu_pid=""
}
# copy_results copies out/ back from the control disk (also after a kill: partial results help).
copy_results() {
	[[ -f $res/ctl.img ]] || return 0
	rm -rf "$res/out"
	debugfs -R "rdump /out $res" "$res/ctl.img" >/dev/null 2>&1 || true
}
trap 'stop_qemu; copy_results' EXIT
trap 'exit 130' INT TERM

# boot_once ATTEMPT: one boot. Returns 0 when QEMU exited by itself (dom0 powered off),
# 124 on the run deadline, 125 when dom0 never started the runner within the boot deadline.
boot_once() {
	local attempt=$1 ctl=$res/ctl.img serial=$res/serial.log t0=$EPOCHREALTIME started=0
	# A fresh control disk each attempt: ext4 made from CTL_DIR, no mount needed on the host.
	rm -f "$ctl"
	truncate -s 256M "$ctl"
	mkfs.ext4 -q -F -L xenblkd-ctl -d "$ctl_dir" "$ctl"
	: >"$serial"
	log "boot attempt $attempt (serial log: $serial)"
	# The serial console is timestamped on the host (seconds since QEMU start).
	rm -f "$res/qemu.pid"
	qemu-system-x86_64 "${qemu_args[@]}" -display none -serial stdio -pidfile "$res/qemu.pid" \
		-drive "file=$ctl,if=virtio,format=raw" </dev/null 2>&1 |
		perl -MTime::HiRes=time -ne 'BEGIN{$|=1;$t0=time} printf "[%8.2f] %s", time-$t0, $_' >"$serial" &
	# $! is the perl end of the pipeline; QEMU tells its own pid through -pidfile.
	local perl_pid=$! i
	for i in $(seq 100); do
		[[ -s $res/qemu.pid ]] && qemu_pid=$(<"$res/qemu.pid") && break
		kill -0 "$perl_pid" 2>/dev/null || break
		sleep 0.1
	done
	[[ -n $qemu_pid ]] || { cat "$serial" >&2; die "QEMU did not start"; }
	# QEMU's CPU time (utime + stime, in clock ticks), read each second while it runs: the last
	# reading is its total, for the CPU use e2e.sh prints beside the wall time.
	local ticks=0 hz st
	hz=$(getconf CLK_TCK)
	while kill -0 "$qemu_pid" 2>/dev/null; do
		local el
		el=$(seconds_since "$t0")
		read -ra st 2>/dev/null <"/proc/$qemu_pid/stat" && ticks=$((st[13] + st[14]))
		if ((started == 0)) && grep -aq XENBLKD-TESTBED-RUNNER-START "$serial"; then
			started=1
			log "dom0 up, runner started after ${el}s"
			echo "dom0_runner_start_s=$el" >>"$res/qemu.txt"
		fi
		if ((started == 0)) && ((${el%.*} >= BOOT_DEADLINE)); then
			log "dom0 did not start the runner within ${BOOT_DEADLINE}s; killing QEMU pid $qemu_pid"
			stop_qemu; wait "$perl_pid" 2>/dev/null || true
			return 125
		fi
		if ((${el%.*} >= RUN_DEADLINE)); then
			log "run deadline ${RUN_DEADLINE}s hit; killing QEMU pid $qemu_pid"
			stop_qemu; wait "$perl_pid" 2>/dev/null || true
			return 124
		fi
		sleep 1
	done
	wait "$qemu_pid" 2>/dev/null || true
	qemu_pid=""
	wait "$perl_pid" 2>/dev/null || true
	echo "qemu_wall_s=$(seconds_since "$t0")" >>"$res/qemu.txt"
	echo "qemu_cpu_s=$((ticks / hz))" >>"$res/qemu.txt"
	return 0
}

: >"$res/qemu.txt"
rc=0
boot_once 1 || rc=$?
if ((rc == 125)); then
	mv "$res/serial.log" "$res/serial-attempt1.log"
	rc=0
	boot_once 2 || rc=$?
fi
trap stop_qemu EXIT
copy_results
if ((rc != 0)); then
	exit "$rc"
fi
[[ -f $res/out/rc ]] || { log "the dom0 script did not finish (no out/rc)"; exit 124; }
exit "$(cat "$res/out/rc")"
