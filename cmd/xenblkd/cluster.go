package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"xenblkd/internal/lease"
	"xenblkd/internal/sanlock"
)

// clusterFlags are the daemon's cluster-mode flags (docs/cluster.md),
// registered in runDaemon (test/docs finds the daemon's flags there).
type clusterFlags struct {
	lockspace, leaseDir, shares, devices, sanlockDir, hostName *string
	hostID                                                     *uint64
	handover                                                   *time.Duration
}

// config returns cluster mode's configuration, or ok=false when it is off.
func (f clusterFlags) config() (cfg lease.Config, ok bool, err error) {
	if *f.lockspace == "" {
		if *f.shares != "" || *f.devices != "" || *f.hostID != 0 {
			return cfg, false, errors.New("--cluster-shares, --cluster-devices and --cluster-host-id need --cluster-lockspace")
		}
		return cfg, false, nil
	}
	parts := strings.Split(*f.lockspace, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || !filepath.IsAbs(parts[1]) {
		return cfg, false, fmt.Errorf("--cluster-lockspace %q: want NAME:PATH[:OFFSET] with an absolute PATH", *f.lockspace)
	}
	cfg.Lockspace = sanlock.Lockspace{Name: parts[0], HostID: *f.hostID, Disk: sanlock.Disk{Path: parts[1]}}
	if len(parts) == 3 {
		if cfg.Lockspace.Disk.Offset, err = strconv.ParseUint(parts[2], 0, 64); err != nil {
			return cfg, false, fmt.Errorf("--cluster-lockspace %q: offset: %w", *f.lockspace, err)
		}
	}
	if len(cfg.Lockspace.Name) > sanlock.NameLen {
		return cfg, false, fmt.Errorf("--cluster-lockspace: name %q longer than %d bytes", parts[0], sanlock.NameLen)
	}
	if *f.hostID < 1 || *f.hostID > 2000 {
		return cfg, false, fmt.Errorf("--cluster-host-id %d: want 1-2000, unique among the hosts sharing the lockspace", *f.hostID)
	}
	cfg.Dir = *f.leaseDir
	for _, s := range splitList(*f.shares) {
		dir, label, _ := strings.Cut(s, "=")
		if !filepath.IsAbs(dir) {
			return cfg, false, fmt.Errorf("--cluster-shares: %q is not an absolute directory", dir)
		}
		cfg.Shares = append(cfg.Shares, lease.Share{Dir: filepath.Clean(dir), Label: label})
	}
	for _, p := range splitList(*f.devices) {
		if _, err := filepath.Match(p, "/dev/x"); err != nil {
			return cfg, false, fmt.Errorf("--cluster-devices: pattern %q: %w", p, err)
		}
		cfg.Devices = append(cfg.Devices, p)
	}
	if len(cfg.Shares) == 0 && len(cfg.Devices) == 0 {
		return cfg, false, errors.New("--cluster-lockspace: name the shared targets with --cluster-shares or --cluster-devices")
	}
	cfg.HostName, cfg.Handover = *f.hostName, *f.handover
	return cfg, true, nil
}

// startCluster joins the lockspace (unless this host is in it already, as
// after a restart of xenblkd) and returns the lease manager.
func startCluster(ctx context.Context, cfg lease.Config, sanlockDir string, log *slog.Logger) (*lease.Manager, error) {
	m := lease.New(cfg, sanlock.Client{Dir: sanlockDir}, log)
	start := time.Now()
	if err := m.Join(ctx); err != nil {
		return nil, fmt.Errorf("%w (is the sanlock daemon running, socket in %s?)", err, sanlockDir)
	}
	log.Info("cluster mode", "lockspace", cfg.Lockspace.Name, "host_id", cfg.Lockspace.HostID,
		"shares", len(cfg.Shares), "device_patterns", len(cfg.Devices), "joined_in", time.Since(start).Round(time.Millisecond))
	return m, nil
}
