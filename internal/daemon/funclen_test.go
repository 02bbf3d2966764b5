package daemon

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// maxFuncLines bounds a function body in this package (lines between its
// braces): a function longer than that does more than one step of the
// lifecycle, and should be split along it.
const maxFuncLines = 60

func TestFunctionLength(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || fn.Body == nil {
				continue
			}
			open, end := fset.Position(fn.Body.Lbrace), fset.Position(fn.Body.Rbrace)
			if n := end.Line - open.Line - 1; n > maxFuncLines {
				t.Errorf("%s:%d: %s is %d lines long; the limit is %d", name, open.Line, fn.Name.Name, n, maxFuncLines)
			}
		}
	}
}
