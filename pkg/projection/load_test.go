package projection

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// errorsOf lists the *Error values joined in err, failing the test on any
// other error.
func errorsOf(t *testing.T, err error) []*Error {
	t.Helper()
	if err == nil {
		return nil
	}
	var out []*Error
	for _, e := range unjoin(err) {
		var pe *Error
		if !errors.As(e, &pe) {
			t.Fatalf("error %v (%T) is not a *projection.Error", e, e)
		}
		out = append(out, pe)
	}
	return out
}

// wantError checks that err holds an *Error on line with problem and fix
// containing the given texts.
func wantError(t *testing.T, err error, line int, problem, fix string) {
	t.Helper()
	for _, e := range errorsOf(t, err) {
		if e.Line == line && strings.Contains(e.Problem, problem) && strings.Contains(e.Fix, fix) {
			return
		}
	}
	t.Errorf("got errors\n%v\nwant one on line %d with problem %q and fix %q", err, line, problem, fix)
}

func TestParse(t *testing.T) {
	src := `projections:
  - name: balances
    tables:
      - CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER)
    on:
      Deposited: UPDATE balances SET balance = balance + :amount WHERE account = :entity
      "*": UPDATE balances SET balance = balance WHERE account = :entity
    forget: DELETE FROM balances WHERE account = :entity
    queries:
      by_account:
        sql: |
          SELECT balance
          FROM balances WHERE account = :account
  - name: empty_optional
    tables: [CREATE TABLE t (a)]
    on: {A: "INSERT INTO t VALUES (1)"}
`
	specs, err := Parse("p.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if len(specs) != 2 {
		t.Fatalf("got %d specs, want 2", len(specs))
	}
	s := specs[0]
	if s.Name != "balances" || len(s.Tables) != 1 || len(s.On) != 2 || s.Forget == "" || len(s.Queries) != 1 {
		t.Errorf("got %+v", s)
	}
	if got, want := s.Queries["by_account"].SQL, "SELECT balance\nFROM balances WHERE account = :account\n"; got != want {
		t.Errorf("query sql = %q, want %q", got, want)
	}
	if got, want := s.src.tables[0].line, 4; got != want {
		t.Errorf("table line = %d, want %d", got, want)
	}
	if got, want := s.src.on["*"].line, 7; got != want {
		t.Errorf(`on "*" line = %d, want %d`, got, want)
	}
	// A literal block maps offsets to lines: FROM is on line 13.
	q := s.Queries["by_account"].SQL
	if got, want := s.src.queries["by_account"].lineAt(q, strings.Index(q, "FROM")), 13; got != want {
		t.Errorf("line of FROM = %d, want %d", got, want)
	}
	if e := specs[1]; e.Forget != "" || e.Queries != nil {
		t.Errorf("optional keys: got %+v", e)
	}
}

func TestParseEmptyList(t *testing.T) {
	for _, src := range []string{"projections: []\n", "projections:\n"} {
		specs, err := Parse("p.yaml", []byte(src))
		if err != nil || len(specs) != 0 {
			t.Errorf("Parse(%q) = %v, %v; want no specs and no error", src, specs, err)
		}
	}
}

// errorCase is a declaration with one problem, the line it is on and
// parts of its message.
type errorCase struct {
	name    string
	src     string
	line    int
	problem string
	fix     string
}

func TestParseErrors(t *testing.T) {
	tests := []errorCase{
		{"empty file", "", 1, "declares nothing", "projections:"},
		{"only a comment", "# nothing\n", 1, "declares nothing", "projections:"},
		{"misspelt top key", "projection:\n  - name: a\n", 1, `unknown key "projection"`, "did you mean projections?"},
		{"misspelt projection key", "projections:\n  - name: a\n    tabels: []\n", 3, `unknown key "tabels"`, "did you mean tables?"},
		{"misspelt forget", "projections:\n  - name: a\n    forgett: x\n", 3, `unknown key "forgett"`, "did you mean forget?"},
		{"misspelt queries", "projections:\n  - name: a\n    querys: {}\n", 3, `unknown key "querys"`, "did you mean queries?"},
		{"unrelated key", "projections:\n  - name: a\n    colour: red\n", 3, `unknown key "colour"`, "the keys here are name, tables, on, forget, queries"},
		{"misspelt sql", "projections:\n  - name: a\n    queries:\n      q:\n        sqll: SELECT 1\n", 5, `unknown key "sqll"`, "did you mean sql?"},
		{"top level is a list", "- name: a\n", 1, "not a mapping", "start the file with projections:"},
		{"projections is a mapping", "projections:\n  name: a\n", 2, "projections is not a list", `"- name:"`},
		{"projection is a string", "projections:\n  - balances\n", 2, "not a mapping", `"- name:"`},
		{"tables is a string", "projections:\n  - name: a\n    tables: CREATE TABLE t (a)\n", 3, "tables is not a list", `"- "`},
		{"table is a mapping", "projections:\n  - name: a\n    tables:\n      - {x: 1}\n", 4, "a table is not a string", "one CREATE statement"},
		{"on is a list", "projections:\n  - name: a\n    on:\n      - INSERT\n", 4, "on is not a mapping", "Deposited: INSERT"},
		{"on value is a list", "projections:\n  - name: a\n    on:\n      A:\n        - INSERT\n        - UPDATE\n", 5, "on A is not a string", "one SQL statement"},
		{"query is a string", "projections:\n  - name: a\n    queries:\n      q: SELECT 1\n", 4, "query q is not a mapping", "q: {sql: SELECT ...}"},
		{"name is a list", "projections:\n  - name: [a]\n", 2, "name is not a string", "lowercase name"},
		{"forget is a list", "projections:\n  - name: a\n    forget: [x]\n", 3, "forget is not a string", "one DELETE"},
		{"duplicate key", "projections:\n  - name: a\n    on:\n      A: INSERT 1\n      A: INSERT 2\n", 5, "A is given twice", "the first is on line 4"},
		{"duplicate projection key", "projections:\n  - name: a\n    name: b\n", 3, "name is given twice", "line 2"},
		{"second document", "projections: []\n---\nprojections: []\n", 2, "second YAML document", "remove the ---"},
		{"syntax error", "projections:\n  - name: a\n    tables: [\n", 3, "YAML syntax", "correct the YAML"},
		{"tab indentation", "projections:\n\t- name: a\n", 2, "YAML syntax", "correct the YAML"},
		{"bare star", "projections:\n  - name: a\n    on:\n      *: INSERT INTO t VALUES (1)\n", 4, "YAML syntax", `quote the key for any other event type: "*":`},
		{"colon space in plain sql", "projections:\n  - name: a\n    on:\n      A: SELECT 'a: b'\n", 4, "YAML syntax", "literal block"},
		{"unclosed quote", "projections:\n  - name: a\n    forget: 'DELETE\n", 3, "YAML syntax", "correct the YAML"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			specs, err := Parse("p.yaml", []byte(tt.src))
			if err == nil {
				t.Fatalf("Parse = %+v, want an error", specs)
			}
			if specs != nil {
				t.Errorf("Parse returned specs %+v with an error", specs)
			}
			wantError(t, err, tt.line, tt.problem, tt.fix)
			if !strings.HasPrefix(err.Error(), "p.yaml:") {
				t.Errorf("error %q does not start with the file name", err)
			}
		})
	}
}

func TestParseReportsEveryProblem(t *testing.T) {
	src := `projections:
  - name: a
    tabels: []
    on: [x]
  - name: b
    forgot: x
    queries:
      q: SELECT 1
`
	_, err := Parse("p.yaml", []byte(src))
	var got []int
	for _, e := range errorsOf(t, err) {
		got = append(got, e.Line)
	}
	if want := []int{3, 4, 6, 8}; !slices.Equal(got, want) {
		t.Errorf("error lines = %v, want %v\n%v", got, want, err)
	}
	if !strings.Contains(err.Error(), `p.yaml:6: projection "b": unknown key "forgot" (fix: did you mean forget?)`) {
		t.Errorf("error %q does not name the projection and the fix", err)
	}
}

func TestParseAliases(t *testing.T) {
	src := `projections:
  - name: a
    tables: [CREATE TABLE t (id TEXT)]
    on:
      A: &del DELETE FROM t WHERE id = :entity
      B: *del
    forget: *del
`
	specs, err := Parse("p.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if s := specs[0]; s.On["B"] != s.On["A"] || s.Forget != s.On["A"] {
		t.Errorf("aliases not followed: %+v", s)
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "projections.yaml")
	if err := os.WriteFile(path, []byte("projections:\n  - name: a\n    tabels: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if want := path + `:3: projection "a": unknown key "tabels" (fix: did you mean tables?)`; err == nil || err.Error() != want {
		t.Errorf("Load error = %v, want %s", err, want)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file = %v, want os.ErrNotExist", err)
	}
}
