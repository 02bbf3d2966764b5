package xenstore_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
	"xenblkd/test/xenstored"
)

// BenchmarkCxenstored measures one client connection against the real C
// xenstored, and in the same run one xenstore-write process per write (what
// the bash block script does), then prints the ratio.
func BenchmarkCxenstored(b *testing.B) {
	d := xenstored.Start(b, xenstored.C)
	ctx := context.Background()
	c, err := xenstore.DialUnix(ctx, d.Socket)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	const p = "/xbbench/backend/vbd/1/51712/physical-device"
	if err := c.Write(ctx, p, "7:0"); err != nil {
		b.Fatal(err)
	}
	perOp := map[string]time.Duration{}
	record := func(name string, b *testing.B) { perOp[name] = b.Elapsed() / time.Duration(b.N) }

	b.Run("Read", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.Read(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
		record("read", b)
	})
	b.Run("Write", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := c.Write(ctx, p, "7:0"); err != nil {
				b.Fatal(err)
			}
		}
		record("write", b)
	})
	b.Run("WriteParallel", func(b *testing.B) { // pipelined on the one connection
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := c.Write(ctx, p, "7:0"); err != nil {
					b.Error(err)
					return
				}
			}
		})
		record("write-parallel", b)
	})
	b.Run("Transaction", func(b *testing.B) { // read + 2 writes + commit, as an attach does
		b.ReportAllocs()
		for b.Loop() {
			err := c.Transaction(ctx, func(tx *xenstore.Tx) error {
				if _, err := tx.Read(ctx, p); err != nil {
					return err
				}
				if err := tx.Write(ctx, p, "7:0"); err != nil {
					return err
				}
				return tx.Write(ctx, p+"-path", "/dev/loop0")
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		record("transaction", b)
	})
	b.Run("ExecXenstoreWrite", func(b *testing.B) {
		tool, err := exec.LookPath("xenstore-write")
		if err != nil {
			testenv.Skip(b, "no xenstore-write (scripts/setup.sh installs xenstore-utils)")
		}
		env := append(os.Environ(), d.Env()...)
		for i := 0; b.Loop(); i++ {
			cmd := exec.Command(tool, p, strconv.Itoa(i))
			cmd.Env = env
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("%v: %s", err, out)
			}
		}
		record("exec", b)
	})
	if w, x := perOp["write"], perOp["exec"]; w > 0 && x > 0 {
		fmt.Printf("cxenstored, one connection: read %v (%.0f ops/s), write %v (%.0f ops/s), "+
			"pipelined write %v (%.0f ops/s), transaction %v (%.0f tx/s)\n",
			perOp["read"], ops(perOp["read"]), w, ops(w), perOp["write-parallel"], ops(perOp["write-parallel"]),
			perOp["transaction"], ops(perOp["transaction"]))
		fmt.Printf("one xenstore-write process per write: %v (%.0f writes/s); ratio exec/client write = %.0fx\n",
			x, ops(x), float64(x)/float64(w))
	}
}

func ops(d time.Duration) float64 {
	if d == 0 {
		return 0
	}
	return float64(time.Second) / float64(d)
}
