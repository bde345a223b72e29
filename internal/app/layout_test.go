package app

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestPkgImportsNoService keeps the house's arrows pointing down: what is
// under pkg/ (what a user may import) imports no service, and only the
// embedding API (pkg/store) reaches the wiring under internal/.
func TestPkgImportsNoService(t *testing.T) {
	const module = "github.com/kumadb/kuma/"
	checked := 0
	err := filepath.WalkDir("../../pkg", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return err
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		checked++
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			switch {
			case strings.HasPrefix(p, module+"services/"):
				t.Errorf("%s imports %s: a package under pkg/ must not depend on a service", path, p)
			case strings.HasPrefix(p, module+"internal/") && !strings.Contains(filepath.ToSlash(path), "pkg/store/"):
				t.Errorf("%s imports %s: only pkg/store (the embedding API) may reach the wiring", path, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 20 {
		t.Fatalf("checked %d files under pkg/: the walk found too little", checked)
	}
}
