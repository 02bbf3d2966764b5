package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
)

// statusReadTimeout bounds all the XenStore reads of one status request: a
// status must answer even when XenStore does not.
const statusReadTimeout = 2 * time.Second

// statusResponse lists every attachment, with the domain's name and the
// backend's vdev read from XenStore (left empty when absent or unreadable: a
// driver domain may not read other domains' names), and the loop devices
// held for no backend.
func (d *Daemon) statusResponse(ctx context.Context) api.Response {
	ctx, cancel := context.WithTimeout(ctx, statusReadTimeout)
	defer cancel()
	list := d.model.List()
	out := make([]api.Attachment, len(list))
	names := map[uint32]string{}
	for i, a := range list {
		out[i] = *toAPI(a)
		name, seen := names[a.Key.Domid]
		if !seen {
			name = d.readOptional(ctx, fmt.Sprintf("/local/domain/%d/name", a.Key.Domid))
			names[a.Key.Domid] = name
		}
		out[i].DomainName = name
		out[i].Vdev = d.readOptional(ctx, hotplug.Backend{Domid: a.Key.Domid, Devid: a.Key.Devid}.Path()+"/dev")
	}
	resp := api.Response{OK: true, Attachments: out}
	for _, h := range d.model.Held() {
		if h.Users == 0 {
			resp.UnusedLoopDevices = append(resp.UnusedLoopDevices, api.LoopDevice{
				Device: h.Path, PhysicalDevice: hotplug.FormatRdev(h.Rdev), DiskSeq: h.DiskSeq,
			})
		}
	}
	return resp
}

// maxStatusValue bounds a name or vdev shown by status.
const maxStatusValue = 128

// readOptional reads an informational node: "" if it is absent, unreadable
// or too long.
func (d *Daemon) readOptional(ctx context.Context, path string) string {
	if ctx.Err() != nil {
		return ""
	}
	v, err := d.store.Read(ctx, path)
	if err != nil {
		if !errors.Is(err, unix.ENOENT) {
			d.log.Debug("status: cannot read", "path", path, "err", err)
		}
		return ""
	}
	if len(v) > maxStatusValue {
		return ""
	}
	return v
}
