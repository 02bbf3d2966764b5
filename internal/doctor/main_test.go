package doctor

import (
	"testing"

	"xenblkd/internal/testenv"
)

// TestMain runs the tests and says which skipped, and why (testenv).
func TestMain(m *testing.M) { testenv.Main(m) }
