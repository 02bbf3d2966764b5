package model

import "time"

// SetReleaseTiming sets how long an add waits for a device the model
// released to be freed, and how often it looks (0: leave as is).
func SetReleaseTiming(m *Model, wait, poll time.Duration) {
	if wait > 0 {
		m.releaseWait = wait
	}
	if poll > 0 {
		m.releasePoll = poll
	}
}

// ReleasedCount is how many released devices the model remembers.
func ReleasedCount(m *Model) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.released)
}
