package xenstore

// PendingRequests reports how many requests of c wait for a reply, so tests
// can tell that a request is in flight without sleeping.
func PendingRequests(c *Client) int {
	c.mu.Lock()
	cn := c.conn
	c.mu.Unlock()
	if cn == nil {
		return 0
	}
	cn.mu.Lock()
	defer cn.mu.Unlock()
	return len(cn.pending)
}

// EventsQueued reports how many events the reader has handed to w so far.
func EventsQueued(w *Watch) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pushed
}
