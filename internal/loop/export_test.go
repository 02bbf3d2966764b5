package loop

// Retries reports how many failed attempts Attach has retried so far.
func Retries() int64 { return retries.Load() }
