package sanlock

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// TestLayout pins the C structs' layout (sanlock.h on x86-64/arm64: a
// uint64 aligned to 8) that the daemon reads byte for byte.
func TestLayout(t *testing.T) {
	ne := binary.NativeEndian
	ls, err := Lockspace{Name: "ls", HostID: 7, Disk: Disk{Path: "/p", Offset: 1 << 20}}.marshal()
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != 1104 || string(ls[:2]) != "ls" || ne.Uint64(ls[48:]) != 7 || string(ls[64:66]) != "/p" || ne.Uint64(ls[64+1024:]) != 1<<20 {
		t.Errorf("sanlk_lockspace layout wrong: len %d", len(ls))
	}
	r, err := Resource{Lockspace: "ls", Name: "res", Disk: Disk{Path: "/q"}, Flags: ResShared | ResPersistent}.marshal(true)
	if err != nil {
		t.Fatal(err)
	}
	if len(r) != 128+1040 || string(r[48:51]) != "res" || ne.Uint32(r[120:]) != ResShared|ResPersistent ||
		ne.Uint32(r[124:]) != 1 || string(r[128:130]) != "/q" {
		t.Errorf("sanlk_resource layout wrong: len %d", len(r))
	}
	for _, bad := range []Disk{{Path: "/a:b"}, {Path: "/a b"}, {Path: string(make([]byte, PathLen))}} {
		if _, err := (Resource{Name: "r", Disk: bad}).marshal(true); err == nil {
			t.Errorf("disk path %q accepted", bad.Path)
		}
	}
	if _, err := (Resource{Name: string(make([]byte, NameLen+1))}).marshal(false); err == nil {
		t.Error("a name longer than 48 bytes accepted")
	}
}

func reply(data, data2 uint32, payload []byte) []byte {
	b := make([]byte, headerSize, headerSize+len(payload))
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], smMagic)
	ne.PutUint32(b[16:], uint32(headerSize+len(payload)))
	ne.PutUint32(b[24:], data)
	ne.PutUint32(b[28:], data2)
	return append(b, payload...)
}

func TestRecv(t *testing.T) {
	h, rest, err := recv(bytes.NewReader(reply(0xffffff0d, 2, []byte("abc"))))
	if err != nil || int32(h.data) != -243 || h.data2 != 2 || string(rest) != "abc" {
		t.Fatalf("recv: %+v %q %v", h, rest, err)
	}
	bad := reply(0, 0, nil)
	bad[0] ^= 1
	if _, _, err := recv(bytes.NewReader(bad)); err == nil {
		t.Error("bad magic accepted")
	}
	if _, _, err := recv(bytes.NewReader(reply(0, 0, nil)[:20])); err == nil {
		t.Error("short header accepted")
	}
}

// FuzzRecv: any bytes from the socket are a reply or an error, never a
// panic or a huge allocation.
func FuzzRecv(f *testing.F) {
	f.Add(reply(0, 0, nil))
	f.Add(reply(0, 1, make([]byte, hostSize)))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, rest, err := recv(bytes.NewReader(b))
		if err != nil {
			return
		}
		if uint32(len(rest))+headerSize != h.length {
			t.Fatalf("payload %d bytes, header says %d", len(rest), h.length)
		}
		unmarshalHosts(rest, h.data2)
	})
}
