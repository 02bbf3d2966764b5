package mdsection

import "testing"

func TestReplace(t *testing.T) {
	tests := []struct{ name, doc, body, want string }{
		{"append", "# T\n\ntext\n", "new", "# T\n\ntext\n\n<!-- begin s (generated) -->\nnew\n<!-- end s -->\n"},
		{"replace", "a\n<!-- begin s (generated) -->\nold\n<!-- end s -->\nb\n", "new\n",
			"a\n<!-- begin s (generated) -->\nnew\n<!-- end s -->\nb\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Replace(tt.doc, "s", tt.body)
			if got != tt.want {
				t.Errorf("Replace = %q, want %q", got, tt.want)
			}
			if Extract(got, "s") == "" || Extract("no markers", "s") != "" {
				t.Errorf("Extract failed on %q", got)
			}
		})
	}
}
