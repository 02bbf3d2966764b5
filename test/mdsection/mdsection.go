// Package mdsection keeps a generated section inside a generated Markdown
// file: benchmarks that each own part of docs/benchmarks.md replace only
// their own section, between HTML comment markers, and carry the others over.
package mdsection

import "strings"

func markers(name string) (begin, end string) {
	return "<!-- begin " + name + " (generated) -->", "<!-- end " + name + " -->"
}

// Extract returns section name of doc, markers included, or "".
func Extract(doc, name string) string {
	begin, end := markers(name)
	i := strings.Index(doc, begin)
	if i < 0 {
		return ""
	}
	j := strings.Index(doc[i:], end)
	if j < 0 {
		return ""
	}
	return doc[i : i+j+len(end)]
}

// Replace puts body into section name of doc, between its markers: in place
// of the section if doc has it, else appended after a blank line.
func Replace(doc, name, body string) string {
	begin, end := markers(name)
	section := begin + "\n" + strings.TrimRight(body, "\n") + "\n" + end
	if old := Extract(doc, name); old != "" {
		return strings.Replace(doc, old, section, 1)
	}
	return strings.TrimRight(doc, "\n") + "\n\n" + section + "\n"
}
