package metrics

import (
	"strings"
	"testing"
)

func TestGaugeVecFunc(t *testing.T) {
	var r Registry
	r.NewGaugeVecFunc("xenblkd_attachments", "Attachments.", []string{"kind", "mode"}, func(emit func(float64, ...string)) {
		emit(0, "block", "w")
		emit(1, "file", "r")
		emit(1, "file", "r") // the same series twice adds up
	})
	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	want := `# HELP xenblkd_attachments Attachments.
# TYPE xenblkd_attachments gauge
xenblkd_attachments{kind="block",mode="w"} 0
xenblkd_attachments{kind="file",mode="r"} 2
`
	if got := b.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}
