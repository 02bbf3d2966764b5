package fdstore

import (
	"math"
	"testing"
)

func TestLoopName(t *testing.T) {
	tests := []struct {
		number  int
		diskseq uint64
		want    string
	}{
		{0, 1, "loop-0-1"},
		{1, 5514, "loop-1-5514"},
		{1048575, math.MaxUint64, "loop-1048575-18446744073709551615"},
	}
	for _, tt := range tests {
		got := LoopName(tt.number, tt.diskseq)
		if got != tt.want {
			t.Errorf("LoopName(%d, %d) = %q, want %q", tt.number, tt.diskseq, got, tt.want)
		}
		if err := ValidName(got); err != nil {
			t.Errorf("LoopName(%d, %d) is not a valid fd name: %v", tt.number, tt.diskseq, err)
		}
		n, seq, err := ParseLoopName(got)
		if err != nil || n != tt.number || seq != tt.diskseq {
			t.Errorf("ParseLoopName(%q) = %d, %d, %v; want %d, %d", got, n, seq, err, tt.number, tt.diskseq)
		}
	}
}

func TestParseLoopNameRejects(t *testing.T) {
	for _, name := range []string{
		"", "stored", "loop-", "loop-1", "loop-1-", "loop--1", "loop-a-1", "loop-1-a",
		"loop-01-5", "loop-1-05", "loop-+1-5", "loop-1-+5", "loop--1-5", "loop-1-5-6",
		"loop-1-18446744073709551616", "loop-2147483648-1", "Loop-1-5", " loop-1-5", "loop-1-5 ",
	} {
		if n, seq, err := ParseLoopName(name); err == nil {
			t.Errorf("ParseLoopName(%q) = %d, %d, nil; want an error", name, n, seq)
		}
	}
}

// FuzzParseLoopName checks that whatever parses is exactly what LoopName
// produces, so a name verified by the daemon cannot be ambiguous.
func FuzzParseLoopName(f *testing.F) {
	for _, s := range []string{"loop-0-1", "loop-1-5514", "loop-01-5", "loop-1-5-6", "stored", "loop-1048575-18446744073709551615"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		n, seq, err := ParseLoopName(name)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("ParseLoopName(%q): negative number %d", name, n)
		}
		if got := LoopName(n, seq); got != name {
			t.Fatalf("ParseLoopName(%q) = %d, %d, but LoopName gives %q", name, n, seq, got)
		}
		if err := ValidName(name); err != nil {
			t.Fatalf("ParseLoopName accepted %q, an invalid fd name: %v", name, err)
		}
	})
}
