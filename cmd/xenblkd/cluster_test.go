package main

import (
	"strings"
	"testing"
	"time"
)

func TestClusterConfig(t *testing.T) {
	str := func(s string) *string { return &s }
	flags := func(lockspace, shares, devices string, id uint64) clusterFlags {
		d := 30 * time.Second
		return clusterFlags{lockspace: str(lockspace), leaseDir: str(""), shares: str(shares),
			devices: str(devices), sanlockDir: str(""), hostName: str(""), hostID: &id, handover: &d}
	}
	for _, tc := range []struct {
		name    string
		f       clusterFlags
		on      bool
		wantErr string
	}{
		{"off", flags("", "", "", 0), false, ""},
		{"shares without lockspace", flags("", "/srv", "", 0), false, "need --cluster-lockspace"},
		{"on", flags("ls:/srv/ls", "/srv/pool=pool", "/dev/mapper/mpath*", 3), true, ""},
		{"offset", flags("ls:/dev/sdz:1048576", "/srv/pool", "", 1), true, ""},
		{"relative path", flags("ls:srv/ls", "/srv", "", 1), false, "absolute PATH"},
		{"no host id", flags("ls:/srv/ls", "/srv", "", 0), false, "1-2000"},
		{"host id too big", flags("ls:/srv/ls", "/srv", "", 2001), false, "1-2000"},
		{"nothing shared", flags("ls:/srv/ls", "", "", 1), false, "--cluster-shares or --cluster-devices"},
		{"relative share", flags("ls:/srv/ls", "pool", "", 1), false, "not an absolute directory"},
		{"bad pattern", flags("ls:/srv/ls", "", "/dev/[", 1), false, "pattern"},
		{"long name", flags(strings.Repeat("n", 49)+":/srv/ls", "/srv", "", 1), false, "longer than 48"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, on, err := tc.f.config()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || on != tc.on {
				t.Fatalf("config: on %v, err %v; want on %v", on, err, tc.on)
			}
			if on && cfg.Lockspace.Name != "ls" {
				t.Fatalf("lockspace %+v", cfg.Lockspace)
			}
		})
	}
}
