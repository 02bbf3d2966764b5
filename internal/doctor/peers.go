package doctor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

	"xenblkd/internal/api"
	"xenblkd/internal/xenstore"
)

// xenStoreProbeNode is read to prove xenstored answers. Any reply counts,
// an error reply too (ENOENT, or EACCES in a driver domain): only a broken or
// silent connection fails.
const xenStoreProbeNode = "/local/domain/0/name"

// readXenStore reads xenStoreProbeNode through the socket or xenbus device at path.
func readXenStore(ctx context.Context, path string) error {
	ctx, cancel := context.WithTimeout(ctx, defaultDialTimeout)
	defer cancel()
	dial := xenstore.OpenXenbus
	if st, err := os.Stat(path); err == nil && st.Mode()&fs.ModeSocket != 0 {
		dial = xenstore.DialUnix
	}
	c, err := dial(ctx, path)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Read(ctx, xenStoreProbeNode)
	// An XS_ERROR reply is an *xenstore.Error whose Err is the errno itself;
	// a broken connection wraps its cause (ErrConnectionLost, ECONNRESET...).
	var xsErr *xenstore.Error
	if err != nil && errors.As(err, &xsErr) {
		if _, replied := xsErr.Err.(syscall.Errno); replied {
			return nil
		}
	}
	return err
}

// HeldByDaemon returns a Held function that asks the daemon at socket, through
// its status API, which loop devices its attachments use.
func HeldByDaemon(socket string) func() (map[int]bool, error) {
	return func() (map[int]bool, error) {
		ctx, cancel := context.WithTimeout(context.Background(), defaultDialTimeout)
		defer cancel()
		resp, err := api.Call(ctx, socket, api.Request{Op: api.OpStatus})
		if err == nil && !resp.OK {
			err = errors.New(resp.Error)
		}
		if err != nil {
			return nil, fmt.Errorf("status from %s: %w", socket, err)
		}
		held := map[int]bool{}
		for _, a := range resp.Attachments {
			if n, ok := strings.CutPrefix(a.Device, "/dev/loop"); ok {
				if num, err := strconv.Atoi(n); err == nil {
					held[num] = true
				}
			}
		}
		return held, nil
	}
}
