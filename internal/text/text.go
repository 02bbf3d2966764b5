// Package text shortens values from outside (XenStore nodes, API requests)
// for the messages that quote them.
package text

// Truncate returns s cut to at most n bytes, marked "..." when cut, so that
// a hostile or mistaken oversized value cannot push a message past
// XenStore's 4 KiB payload (hotplug-error) or flood a log line.
func Truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
