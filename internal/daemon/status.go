package daemon

import (
	"context"
	"time"

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
	bs := make([]hotplug.Backend, len(list))
	for i, a := range list {
		out[i] = *toAPI(a)
		bs[i] = backendOf(a.Key)
	}
	for i, l := range hotplug.ReadLabels(ctx, d.store, bs...) {
		out[i].DomainName, out[i].Vdev = l.Domain, l.Vdev
	}
	resp := api.Response{OK: true, Attachments: out, Leases: d.leaseStatus(), Cluster: d.clusterStatus()}
	for _, h := range d.model.Held() {
		if h.Users == 0 {
			resp.UnusedLoopDevices = append(resp.UnusedLoopDevices, api.LoopDevice{
				Device: h.Path, PhysicalDevice: hotplug.FormatRdev(h.Rdev), DiskSeq: h.DiskSeq,
			})
		}
	}
	return resp
}
