package main

import "strings"

// splitList splits a comma-separated flag value (--scripts), dropping empty
// entries.
func splitList(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}
