# 51-libvirt.sh: upstream libvirt (Debian 12's libxl driver) with xenblkd serving as block
# (issue 14, libvirt scenario). Sourced by suite.sh; group `libvirt`. Needs the image's libvirt
# packages (build-image.sh); says so and fails if they are missing.
#
# With `xenblkd takeover` on: `virsh create` a guest with 4 disks (2 rw files, a read-only image
# shared with a second guest, a phy: device): all Connected, the guest reads every signature; a
# second guest asking for a rw image in use fails with xenblkd's message in virsh's error;
# `virsh destroy` frees everything. The stock block is restored at the end.

LV=(timeout 300 virsh -c xen:///system)
LV_UNITS=() # the release's own libvirt units lv_stop_release_libvirtd stopped

# lv_xml NAME HOLD DISK_XML...: a PV domain for libvirt's libxl driver.
lv_xml() {
	local name=$1 hold=$2 extra="console=hvc0 quiet xbd.disks=$(($# - 2))"
	shift 2
	[[ $hold == 1 ]] && extra="$extra xbd.idle" # up until destroyed; nothing here waits for DOMU-READ
	{
		echo "<domain type='xen'><name>$name</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
		echo "<os><type>linux</type><kernel>/root/domu/vmlinux</kernel><initrd>/root/domu/initrd.gz</initrd><cmdline>$extra</cmdline></os>"
		echo "<on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash><devices>"
		printf '%s\n' "$@"
		echo "<console type='pty'><target type='xen' port='0'/></console></devices></domain>"
	} >"$WORK/$name.xml"
}
lv_file() { echo "<disk type='file' device='disk'><driver name='phy'/><source file='$1'/><target dev='$2' bus='xen'/>${3:-}</disk>"; }
lv_block() { echo "<disk type='block' device='disk'><driver name='phy'/><source dev='$1'/><target dev='$2' bus='xen'/></disk>"; }

lv_cleanup() {
	local g
	for g in t51-a t51-b t51-c; do "${LV[@]}" destroy "$g" >/dev/null 2>&1; done
	[[ -n ${LV_PHY:-} ]] && losetup -d "$LV_PHY"
	LV_PHY=""
	if ! tko_block_is_stock; then timeout 60 xenblkd takeover --undo || report "INFO libvirt: takeover --undo failed in cleanup"; fi
	local pid deadline
	pid=$(cat /run/xenblkd-e2e-libvirtd.pid 2>/dev/null)
	if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
		# It lets go of the libxl driver's pid file when it exits: wait for that before the
		# release's own libvirtd may start again.
		deadline=$(($(now) + 30))
		while kill -0 "$pid" 2>/dev/null && (($(now) < deadline)); do sleep 0.2; done
	fi
	if ((${#LV_UNITS[@]})); then
		timeout 60 systemctl start "${LV_UNITS[@]}" || report "INFO libvirt: could not start ${LV_UNITS[*]} again in cleanup"
	fi
	LV_UNITS=()
	cp /var/log/libvirt/libxl/*.log "$OUT/" 2>/dev/null
}

# lv_stop_release_libvirtd: Debian 13's libvirt-daemon enables libvirtd.service and its sockets
# (Debian 12's has no units: they are libvirt-daemon-system's). Such a libvirtd whose libxl
# driver has started holds that driver's pid file (/run/libvirt/libxl/driver.pid): the test's
# own libvirtd then fails to initialise its libxl driver and exits, and nothing answers on the
# socket. Whether it holds the file here depends on the boot (seen both ways, its libvirtd
# running in each), so it is stopped, sockets with it (a connection would start it again), and
# started again by lv_cleanup. Sets LV_UNITS.
lv_stop_release_libvirtd() {
	local u
	LV_UNITS=()
	for u in libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket libvirtd.service; do
		systemctl -q is-active "$u" 2>/dev/null && LV_UNITS+=("$u")
	done
	((${#LV_UNITS[@]})) || return 0
	report "INFO libvirt: the release's own libvirt units are active (${LV_UNITS[*]}): stopped for the test's libvirtd, started again afterwards"
	timeout 60 systemctl stop "${LV_UNITS[@]}"
}
lv_release_libvirtd_stopped() {
	local u
	for u in "${LV_UNITS[@]}"; do
		! systemctl -q is-active "$u" 2>/dev/null || return 1
	done
}

test_libvirt() {
	local p=t51 out rc t0 domid msg
	CURRENT_SCRIPT=xenblkd
	TEST_DOMIDS=()
	xenblkd_ready "$p: libvirt" || return
	if ! command -v virsh >/dev/null; then
		fail "$p: libvirt" "virsh not installed in the dom0 image (build-image.sh PACKAGES)"
		return
	fi
	# libvirt-daemon without libvirt-daemon-system has no units, no polkit and no libvirt-qemu
	# user: libvirtd by hand (stopped by pid at the end), root's socket without authentication,
	# and only the libxl driver loaded (the qemu driver, a dependency, would fail to initialise).
	mkdir -p "$WORK/libvirt-drivers"
	ln -sf /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_libxl.so "$WORK/libvirt-drivers/"
	printf 'auth_unix_rw = "none"\nauth_unix_ro = "none"\n' >"$WORK/libvirtd.conf"
	lv_stop_release_libvirtd
	if ((${#LV_UNITS[@]})); then
		check "$p: the release's own libvirtd is stopped" "still active: $(systemctl is-active "${LV_UNITS[@]}" | tr '\n' ' ')" \
			lv_release_libvirtd_stopped
	fi
	LIBVIRT_LOG_OUTPUTS="3:file:$OUT/libvirtd.log" LIBVIRT_DRIVER_DIR=$WORK/libvirt-drivers timeout 60 libvirtd --daemon --config "$WORK/libvirtd.conf" \
		--pid-file=/run/xenblkd-e2e-libvirtd.pid >"$OUT/libvirtd-start.log" 2>&1
	local deadline=$(($(now) + 60))
	until "${LV[@]}" version >"$OUT/virsh-version.txt" 2>&1 || (($(now) >= deadline)); do sleep 1; done
	check "$p: libvirtd answers on xen:///system (libxl driver)" \
		"$(tr '\n' ' ' <"$OUT/virsh-version.txt"); libvirtd: $(grep -a ' error : ' "$OUT/libvirtd.log" 2>/dev/null | tail -2 | tr '\n' ' ')" \
		grep -q 'hypervisor: Xen' "$OUT/virsh-version.txt"
	out=$(timeout 120 xenblkd takeover 2>&1)
	check "$p: xenblkd takeover" "$out" test $? = 0
	tko_img lv1 LV-D1
	tko_img lv2 LV-D2
	tko_img lvro LV-RO
	tko_img lvphy LV-PHY
	LV_PHY=$(losetup -f --show "$WORK/tko-lvphy.img")
	lv_xml "$p-a" 1 "$(lv_file "$WORK/tko-lv1.img" xvda)" "$(lv_file "$WORK/tko-lv2.img" xvdb)" \
		"$(lv_file "$WORK/tko-lvro.img" xvdc '<readonly/>')" "$(lv_block "$LV_PHY" xvdd)"
	t0=$EPOCHREALTIME
	"${LV[@]}" create "$WORK/$p-a.xml" >"$OUT/virsh-create-$p-a.log" 2>&1
	rc=$?
	say "$p: virsh create of a guest with 4 disks: rc=$rc, $(elapsed "$t0")s"
	check "$p: virsh create with 4 disks" "rc=$rc: $(tr '\n' ' ' <"$OUT/virsh-create-$p-a.log")" test "$rc" = 0
	check "$p: all 4 vbds Connected" "not Connected" wait_connected "$p-a" 4
	check "$p: the guest reads every disk" "signature mismatch" guest_reads "$p-a" LV-D1 LV-D2 LV-RO LV-PHY
	domid=$(domid_of "$p-a")
	check "$p: xenblkd attached all 4" "status" tko_status_has "$domid" 4

	lv_xml "$p-b" 1 "$(lv_file "$WORK/tko-lvro.img" xvda '<readonly/>')"
	"${LV[@]}" create "$WORK/$p-b.xml" >"$OUT/virsh-create-$p-b.log" 2>&1
	check "$p: a second guest shares the read-only image" "rc=$?" test $? = 0
	check "$p: second guest connected" "not Connected" wait_connected "$p-b" 1
	check "$p: one loop device for the shared read-only image" "found $(loops_on "$WORK/tko-lvro.img")" \
		test "$(loops_on "$WORK/tko-lvro.img")" = 1

	lv_xml "$p-c" 0 "$(lv_file "$WORK/tko-lv1.img" xvda)"
	"${LV[@]}" create "$WORK/$p-c.xml" >"$OUT/virsh-create-$p-c.log" 2>&1
	rc=$?
	msg=$(tr '\n' ' ' <"$OUT/virsh-create-$p-c.log")
	say "$p: a guest asking for an rw image in use: rc=$rc: $msg"
	check "$p: virsh create of a guest asking for an rw image in use fails" "rc=$rc" test "$rc" != 0
	# libvirt 9.0 reports "libxenlight failed to create new domain"; the script's hotplug-error is
	# in libvirt's log of libxl (/var/log/libvirt/libxl/libxl-driver.log, "... script: MESSAGE").
	local lxlog
	lxlog=$(grep -a 'script: .*tko-lv1.img' /var/log/libvirt/libxl/libxl-driver.log 2>/dev/null | sed 's/.*script: //' | tail -1)
	say "$p: libvirt's libxl-driver.log: ${lxlog:-<none>}"
	check "$p: the refusal is xenblkd's and names the domain using the image" "virsh [$msg] libxl log [$lxlog]" \
		eval '[[ "$msg $lxlog" == *"refusing to attach"*"domain $domid device"* ]]'
	if [[ $msg == *"refusing to attach"* ]]; then
		report "INFO $p: virsh's own error carries xenblkd's message"
	else
		report "INFO $p: virsh's own error does not carry xenblkd's message (libvirt reports libxl's failure generically); /var/log/libvirt/libxl/libxl-driver.log does"
	fi

	t0=$EPOCHREALTIME
	"${LV[@]}" destroy "$p-a" >/dev/null 2>&1
	"${LV[@]}" destroy "$p-b" >/dev/null 2>&1
	check "$p: virsh destroy frees every loop device" "leaked" \
		tko_loops_gone "$WORK/tko-lv1.img" "$WORK/tko-lv2.img" "$WORK/tko-lvro.img"
	say "$p: virsh destroy to freed: $(elapsed "$t0")s"
	check "$p: the phy device is left bound to its image" "detached" \
		test "$(losetup -nO BACK-FILE "$LV_PHY" 2>/dev/null)" = "$WORK/tko-lvphy.img"
	check "$p: nothing attached afterwards" "status" tko_status_has "$domid" 0
	lv_cleanup
}
group libvirt test_libvirt
