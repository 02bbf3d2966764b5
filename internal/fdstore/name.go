package fdstore

import (
	"fmt"
	"strconv"
	"strings"
)

// loopNamePrefix starts the name of every stored loop device fd.
const loopNamePrefix = "loop-"

// LoopName is the fd store name of loop device number (/dev/loop<number>)
// bound with diskseq: "loop-<number>-<diskseq>", both decimal. The pair
// identifies one binding: a reused device number gets a new diskseq.
func LoopName(number int, diskseq uint64) string {
	return loopNamePrefix + strconv.Itoa(number) + "-" + strconv.FormatUint(diskseq, 10)
}

// ParseLoopName is the inverse of LoopName. It accepts only the canonical
// form (decimal, no sign, no leading zeros), so that a name parses only if
// LoopName would have produced it.
func ParseLoopName(name string) (number int, diskseq uint64, err error) {
	rest, ok := strings.CutPrefix(name, loopNamePrefix)
	numStr, seqStr, ok2 := strings.Cut(rest, "-")
	if !ok || !ok2 {
		return 0, 0, fmt.Errorf("fdstore: %q is not a loop device name (want loop-<number>-<diskseq>)", name)
	}
	// Loop minors are 20 bits (1<<20 >> part_shift); a 32-bit bound is enough
	// to reject nonsense while staying an int everywhere.
	n, err := parseCanonical(numStr, 31)
	if err != nil {
		return 0, 0, fmt.Errorf("fdstore: loop name %q: device number: %w", name, err)
	}
	seq, err := parseCanonical(seqStr, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("fdstore: loop name %q: diskseq: %w", name, err)
	}
	return int(n), seq, nil
}

func parseCanonical(s string, bits int) (uint64, error) {
	if s == "" || (len(s) > 1 && s[0] == '0') || s[0] == '+' {
		return 0, fmt.Errorf("%q is not a canonical decimal number", s)
	}
	return strconv.ParseUint(s, 10, bits)
}
