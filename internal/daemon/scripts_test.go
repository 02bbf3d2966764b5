package daemon

import (
	"os"
	"path/filepath"
	"testing"
)

func TestScriptsOurs(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "xenblkd-binary")
	other := filepath.Join(dir, "block-iscsi")
	for _, f := range []string{bin, other} {
		if err := os.WriteFile(f, []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	entry := filepath.Join(dir, "entry")
	block := filepath.Join(dir, "block")
	os.Symlink(bin, entry)
	os.Symlink(bin, block)
	s := Scripts{Extra: []string{"xenblkd-block", "/opt/xen/my-script"}, Entry: entry}
	for _, tc := range []struct {
		script string
		want   bool
	}{
		{"/etc/xen/scripts/xenblkd", true},         // base name
		{"/usr/sbin/xenblkd", true},                // base name
		{"/etc/xen/scripts/xenblkd-block", true},   // --scripts entry without "/": base name (issue 12)
		{"xenblkd-block", true},                    // as written
		{"/opt/xen/my-script", true},               // --scripts entry with "/": whole path
		{"/elsewhere/my-script", false},            // ... only that path
		{block, true},                              // a link to the entry's file (takeover)
		{bin, true},                                // the entry's file itself
		{other, false},                             // another script
		{"/etc/xen/scripts/block-drbd", false},     // missing: never ours by identity
		{"", false},                                // no script node value
		{"block", false},                           // relative: no identity check
		{filepath.Join(dir, "nonexistent"), false}, // unstat-able
	} {
		if got := s.Ours(tc.script); got != tc.want {
			t.Errorf("Ours(%q) = %v, want %v", tc.script, got, tc.want)
		}
	}
	// After the undo block is a plain script again.
	os.Remove(block)
	os.WriteFile(block, []byte("#!/bin/bash\n"), 0o755)
	if s.Ours(block) {
		t.Errorf("Ours(%q) after the undo = true", block)
	}
	// The zero value: base name only (and the default entry, absent here).
	if (Scripts{}).Ours("/etc/xen/scripts/xenblkd-block") {
		t.Error("zero Scripts recognises xenblkd-block")
	}
}
