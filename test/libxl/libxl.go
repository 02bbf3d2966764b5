// Package libxl reproduces, for tests and benchmarks, what libxl does around a
// disk's hotplug script (libxl_device.c, libxl_disk.c; the same in 4.17 and
// 4.20): the backend and frontend nodes device_disk_add writes in one transaction, and
// the argv and environment it execs the script with. Every harness that
// stands in for libxl (the end-to-end tests, the recovery tests, make bench)
// uses this one description of the contract.
package libxl

import (
	"context"
	"fmt"
	"strconv"

	"xenblkd/internal/xenstore"
)

// Omit as a Disk's Params or Mode leaves that node out (bad-input tests).
const Omit = "\x00"

// Disk is one disk as libxl's device_disk_add writes it for a dom0 backend.
type Disk struct {
	Domid, Devid int
	Params, Mode string // written verbatim (Omit: not written)
	Script       string // the backend's script node: an absolute path
	Vdev         string // the dev node; "" means xvda
	// State is the backend's state node: libxl writes 1 (Initialising) and
	// blkback's probe then 2 (InitWait), which libxl waits for before it
	// execs the script. Harnesses without blkback write 2 themselves. 0 means 1.
	State int
	// VM is the domain's vm node (libxl: /vm/<uuid>, the same for the
	// domains of one VM, e.g. both ends of a migration to localhost). ""
	// means a VM of its own: /vm/00000000-0000-0000-0000-<domid>.
	VM string
	// CDROM: a CD-ROM drive (device-type cdrom, removable 1 in the backend,
	// device-type cdrom in the frontend). Since Xen 4.19 an empty drive with a
	// phy backend has as Params a 0-byte placeholder libxl creates, mode 0400:
	// EmptyCDROM.
	CDROM bool
	// Kind is the backend's device kind: "" or "vbd" (phy, the block script),
	// "vbd3" (backendtype=tap since Xen 4.19, the block-tap script).
	Kind string
}

// EmptyCDROM is the placeholder libxl (4.19+) passes as an empty CD-ROM's
// params for the guest targetDomid (LIBXL_STUBDOM_EMPTY_CDROM.<domid>); a stub
// domain's drive gets its guest's.
func EmptyCDROM(targetDomid int) string {
	return fmt.Sprintf("/var/run/xen/empty-cdrom.%d", targetDomid)
}

// Backend is the backend's path relative to the backend domain, i.e. the
// XENBUS_PATH libxl gives the script.
func (d Disk) Backend() string {
	kind := d.Kind
	if kind == "" {
		kind = "vbd"
	}
	return fmt.Sprintf("backend/%s/%d/%d", kind, d.Domid, d.Devid)
}

// BackendAbs is the backend's absolute path (backend domain 0).
func (d Disk) BackendAbs() string { return "/local/domain/0/" + d.Backend() }

// Frontend is the frontend's absolute path.
func (d Disk) Frontend() string {
	return fmt.Sprintf("/local/domain/%d/device/vbd/%d", d.Domid, d.Devid)
}

// Nodes lists every node libxl writes for the disk, with absolute paths:
// the domain's vm and name, the backend directory and the frontend's.
func (d Disk) Nodes() [][2]string {
	be, fe, dom := d.BackendAbs(), d.Frontend(), fmt.Sprintf("/local/domain/%d", d.Domid)
	vdev, state := d.Vdev, d.State
	if vdev == "" {
		vdev = "xvda"
	}
	deviceType, removable := "disk", "0"
	if d.CDROM {
		deviceType, removable = "cdrom", "1"
	}
	if state == 0 {
		state = 1
	}
	vm := d.VM
	if vm == "" {
		vm = fmt.Sprintf("/vm/00000000-0000-0000-0000-%012d", d.Domid)
	}
	nodes := [][2]string{
		{dom + "/vm", vm},
		{dom + "/name", fmt.Sprintf("guest%d", d.Domid)},
		{be + "/frontend", fe}, {be + "/script", d.Script},
		{be + "/frontend-id", strconv.Itoa(d.Domid)}, {be + "/online", "1"},
		{be + "/removable", removable}, {be + "/bootable", "1"}, {be + "/state", strconv.Itoa(state)},
		{be + "/dev", vdev}, {be + "/type", "phy"}, {be + "/device-type", deviceType},
		{be + "/discard-enable", "1"}, {be + "/specification", "xen"},
		{fe + "/backend", be}, {fe + "/backend-id", "0"}, {fe + "/state", "1"},
		{fe + "/virtual-device", strconv.Itoa(d.Devid)}, {fe + "/device-type", deviceType}, {fe + "/trusted", "1"},
	}
	if d.Params != Omit {
		nodes = append(nodes, [2]string{be + "/params", d.Params})
	}
	if d.Mode != Omit {
		nodes = append(nodes, [2]string{be + "/mode", d.Mode})
	}
	return nodes
}

// Write writes the disk's nodes in one transaction, as libxl does.
func Write(ctx context.Context, xs *xenstore.Client, d Disk) error {
	nodes := d.Nodes()
	err := xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		for _, n := range nodes {
			if err := tx.Write(ctx, n[0], n[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("write backend %s: %w", d.Backend(), err)
	}
	return nil
}

// Remove removes the backend and frontend directories, as libxl's
// libxl__device_destroy does after the script's remove.
func Remove(ctx context.Context, xs *xenstore.Client, d Disk) {
	xs.Rm(ctx, d.BackendAbs())
	xs.Rm(ctx, d.Frontend())
}

// ScriptEnv is the environment libxl adds for the script (get_hotplug_env):
// script, XENBUS_TYPE, XENBUS_PATH (relative) and XENBUS_BASE_PATH. libxl
// execs it with argv [script, add|remove] and stdin /dev/null.
func ScriptEnv(script, xenbusPath string) []string {
	return []string{"script=" + script, "XENBUS_TYPE=vbd", "XENBUS_PATH=" + xenbusPath, "XENBUS_BASE_PATH=backend"}
}
