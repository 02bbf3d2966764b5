package loop

// Retries reports how many failed attempts Attach has retried so far.
func Retries() int64 { return retries.Load() }

// SetIndexRcvBuf sets the receive buffer of the indexes made from now on and
// returns the previous value.
func SetIndexRcvBuf(n int) int { old := indexRcvBuf; indexRcvBuf = n; return old }

// Pause holds the index's lock, so that events queue up in its socket until
// the returned function is called.
func (ix *Index) Pause() (resume func()) { ix.mu.Lock(); return ix.mu.Unlock }

// ParseLoopUevent is parseLoopUevent.
var ParseLoopUevent = parseLoopUevent
