package projection

import (
	"context"
	"errors"
	"os"
	"testing"
)

// FuzzParse feeds any bytes to the projection file parser and, when they
// parse, to the compiler: nothing panics, and every refusal is an *Error
// (file, line, fix), never a stack trace or a bare library error.
func FuzzParse(f *testing.F) {
	if b, err := os.ReadFile("testdata/example.yaml"); err == nil {
		f.Add(b)
	}
	for _, s := range []string{
		"projections: []\n",
		"projections:\n  - name: a\n    tables: [CREATE TABLE t (x)]\n    on: {E: INSERT INTO t VALUES (:x)}\n",
		"projections:\n  - name: a\n    querys: {}\n",
		"projections: [\n",
		": : :",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, src []byte) {
		specs, err := Parse("fuzz.yaml", src)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("Parse(%q) = %v (%T), want *Error", src, err, err)
			}
			return
		}
		if _, err := CompileAll(context.Background(), specs); err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("CompileAll of %q = %v (%T), want *Error", src, err, err)
			}
		}
	})
}
