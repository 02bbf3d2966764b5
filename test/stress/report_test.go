package main

import (
	"os"
	"strings"
	"testing"
)

// testdata/mixed.json is `go test -json -cpu 1,2` of two scratch packages:
// probe/q (TestPass, TestFail, TestSkip, TestSub with a failing b) and
// probe/r (TestOK, TestPanic, which panics and ends its binary).
func TestCollectorTalliesRuns(t *testing.T) {
	col := newCollector()
	for run := 1; run <= 2; run++ {
		f, err := os.Open("testdata/mixed.json")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		res := col.read(f, run)
		if res.parseErr != nil || len(res.stray) != 0 {
			t.Fatalf("run %d: parse error %v, stray lines %q", run, res.parseErr, res.stray)
		}
	}
	for _, tt := range []struct {
		key            testKey
		runs, failures int
		output         string // in the first failure's output
	}{
		{testKey{"probe/q", "TestPass"}, 4, 0, ""},
		{testKey{"probe/q", "TestSkip"}, 4, 0, ""},
		{testKey{"probe/q", "TestFail"}, 4, 4, "boom"},
		{testKey{"probe/q", "TestSub/b"}, 4, 4, "sub b broke"},
		{testKey{"probe/q", "TestSub"}, 4, 4, ""},
		{testKey{"probe/q", ""}, 2, 0, ""}, // its tests say why it failed
		{testKey{"probe/r", "TestPanic"}, 2, 2, "kaboom"},
		{testKey{"probe/r", "TestOK"}, 2, 0, ""},
	} {
		got := col.tests[tt.key]
		if got == nil {
			t.Errorf("%s: not seen", tt.key)
			continue
		}
		if got.runs != tt.runs || got.failures != tt.failures || got.firstRun != min(tt.failures, 1) {
			t.Errorf("%s: %d runs, %d failures, first in run %d; want %d, %d, %d", tt.key,
				got.runs, got.failures, got.firstRun, tt.runs, tt.failures, min(tt.failures, 1))
		}
		if !strings.Contains(got.firstFailure, tt.output) {
			t.Errorf("%s: first failure's output lacks %q:\n%s", tt.key, tt.output, got.firstFailure)
		}
	}
	var report strings.Builder
	if n := col.report(&report); n != 4 {
		t.Errorf("report: %d failing tests, want 4:\n%s", n, report.String())
	}
	for _, want := range []string{"       4        4  probe/q TestFail", "=== probe/r TestPanic: first failure (run 1):", "    panic: kaboom"} {
		if !strings.Contains(report.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, report.String())
		}
	}
}

// A package whose binary fails outside any test (TestMain, a build error)
// is the failure itself, with its output.
func TestCollectorPackageFailure(t *testing.T) {
	stream := `{"Action":"start","Package":"p"}
{"Action":"output","Package":"p","Output":"start xenstored: not found\n"}
{"Action":"output","Package":"p","Output":"FAIL\tp\t0.01s\n"}
{"Action":"fail","Package":"p","Elapsed":0.01}
`
	col := newCollector()
	res := col.read(strings.NewReader(stream), 1)
	if len(res.failed) != 1 || res.failed[0] != (testKey{Package: "p"}) {
		t.Fatalf("failed = %v, want the package", res.failed)
	}
	if got := col.tests[testKey{Package: "p"}].firstFailure; !strings.Contains(got, "start xenstored: not found") {
		t.Errorf("first failure's output = %q", got)
	}
}

// A build failure is reported with the compiler's messages.
func TestCollectorBuildFailure(t *testing.T) {
	stream := `{"ImportPath":"p [p.test]","Action":"build-output","Output":"# p [p.test]\n"}
{"ImportPath":"p [p.test]","Action":"build-output","Output":"p/x.go:3:2: undefined: y\n"}
{"ImportPath":"p [p.test]","Action":"build-fail"}
{"Action":"start","Package":"p"}
{"Action":"output","Package":"p","Output":"FAIL\tp [build failed]\n"}
{"Action":"fail","Package":"p","Elapsed":0,"FailedBuild":"p [p.test]"}
`
	col := newCollector()
	res := col.read(strings.NewReader(stream), 1)
	if len(res.failed) != 1 || len(res.stray) != 0 {
		t.Fatalf("failed = %v, stray = %q; want the package, none", res.failed, res.stray)
	}
	if got := col.tests[testKey{Package: "p"}].firstFailure; !strings.Contains(got, "undefined: y") || !strings.Contains(got, "[build failed]") {
		t.Errorf("first failure's output = %q", got)
	}
}

func TestTrimLines(t *testing.T) {
	got := trimLines("a\nb\nc\nd\ne\nf\ng\n", 3)
	if want := "a\n[4 lines cut]\nf\ng"; got != want {
		t.Errorf("trimLines = %q, want %q", got, want)
	}
}
