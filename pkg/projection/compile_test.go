package projection

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// compileYAML parses src, which must be well-formed, and compiles it.
func compileYAML(t *testing.T, src string) ([]*Compiled, error) {
	t.Helper()
	specs, err := Parse("projections.yaml", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return CompileAll(context.Background(), specs)
}

// head declares projection balances and its table on lines 1 to 4; the
// cases below continue on line 5.
const head = `projections:
  - name: balances
    tables:
      - CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0)
`

// onOK is a valid on: for head, on lines 5 and 6.
const onOK = `    on:
      Deposited: UPDATE balances SET balance = balance + :amount WHERE account = :entity
`

func TestCompileErrors(t *testing.T) {
	tests := []errorCase{
		// name
		{"invalid name", "projections:\n  - name: Bad-Name\n    tables: [CREATE TABLE t (a)]\n    on: {A: INSERT INTO t VALUES (1)}\n",
			2, `"Bad-Name" is not a valid name`, "such as bad_name"},
		{"name too long", "projections:\n  - name: " + strings.Repeat("a", 64) + "\n    tables: [CREATE TABLE t (a)]\n    on: {A: INSERT INTO t VALUES (1)}\n",
			2, "is not a valid name", "1 to 63 lowercase letters"},
		{"reserved name", "projections:\n  - name: entities\n    tables: [CREATE TABLE t (a)]\n    on: {A: INSERT INTO t VALUES (1)}\n",
			2, "entities is the built-in projection", "choose another name"},
		{"missing name", "projections:\n  - tables: [CREATE TABLE t (a)]\n    on: {A: INSERT INTO t VALUES (1)}\n",
			2, "has no name", "add name:"},

		// required parts
		{"no tables", "projections:\n  - name: balances\n    on: {A: INSERT INTO t VALUES (1)}\n",
			2, "declares no tables", "add tables:"},
		{"no events", head, 2, "handles no events", "map at least one event type"},
		{"empty statement", head + "    on:\n      Deposited:\n", 6, "the statement is empty", "write one SQL statement"},
		{"only a comment", head + "    on:\n      Deposited: '-- nothing'\n", 6, "the statement is empty", "write one SQL statement"},

		// event types
		{"invalid event type", head + "    on:\n      Bad Type: DELETE FROM balances\n", 6, `event type "Bad Type" must match`, `"*" for every other type`},

		// one statement
		{"two statements", head + "    on:\n      Deposited: DELETE FROM balances; DELETE FROM balances\n", 6, "more than one statement", "one statement per event type"},
		{"two tables in one item", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE a (x); CREATE TABLE b (y)\n    on: {A: INSERT INTO a VALUES (1)}\n",
			4, "more than one statement", "an item of its own"},

		// parameter forms
		{"question mark", head + "    on:\n      Deposited: UPDATE balances SET balance = ? WHERE account = :entity\n", 6, "parameter ? is not supported", "use :name"},
		{"numbered question mark", head + "    on:\n      Deposited: UPDATE balances SET balance = ?1 WHERE account = :entity\n", 6, "parameter ?1 is not supported", "use :name"},
		{"at sign", head + "    on:\n      Deposited: UPDATE balances SET balance = @amount WHERE account = :entity\n", 6, "parameter @amount is not supported", "use :amount"},
		{"dollar", head + "    on:\n      Deposited: UPDATE balances SET balance = $amount WHERE account = :entity\n", 6, "parameter $amount is not supported", "use :amount"},
		{"tcl form", head + "    on:\n      Deposited: UPDATE balances SET balance = :a::b WHERE account = :entity\n", 6, "parameter :a::b is not supported", "use :name"},
		{"underscore parameter", head + "    on:\n      Deposited: UPDATE balances SET balance = :_amount WHERE account = :entity\n", 6, "parameter :_amount cannot be bound", "such as :amount; reach a data field named _amount with json_extract(:data, '$._amount')"},
		{"underscore query parameter", head + onOK + "    queries:\n      q:\n        sql: SELECT * FROM balances WHERE account = :__a\n", 9, "parameter :__a cannot be bound", "such as :a"},
		{"bad parameter in a literal block", head + "    on:\n      Deposited: |\n        UPDATE balances\n        SET balance = ?\n        WHERE account = :entity\n",
			8, "parameter ? is not supported", "use :name"},

		// what a statement may do
		{"select for an event", head + "    on:\n      Deposited: SELECT * FROM balances\n", 6, "a statement for an event must change the read model", "INSERT, UPDATE, DELETE or REPLACE"},
		{"with select for an event", head + "    on:\n      Deposited: WITH x AS (SELECT 1) SELECT * FROM x\n", 6, "must change the read model", "INSERT, UPDATE, DELETE or REPLACE"},
		{"ddl for an event", head + "    on:\n      Deposited: DROP TABLE balances\n", 6, "may not run DROP", "declare tables under tables:"},
		{"pragma for an event", head + "    on:\n      Deposited: PRAGMA journal_mode = off\n", 6, "may not run PRAGMA", "INSERT, UPDATE, DELETE or REPLACE"},
		{"forget reads", head + onOK + "    forget: SELECT 1\n", 7, "must change the read model", "INSERT, UPDATE, DELETE or REPLACE"},
		{"forget binds data", head + onOK + "    forget: UPDATE balances SET balance = :amount WHERE account = :entity\n", 7, "may use only :entity, not :amount", "match its rows by :entity"},
		{"query writes", head + onOK + "    queries:\n      wipe:\n        sql: DELETE FROM balances\n", 9, "a query may not run DELETE", "queries are read-only: start with SELECT or WITH"},
		{"query writes after with", head + onOK + "    queries:\n      wipe:\n        sql: WITH x AS (SELECT 1) DELETE FROM balances\n", 9, "a query may not run DELETE", "queries are read-only: start with SELECT or WITH"},
		{"query attaches", head + onOK + "    queries:\n      a:\n        sql: ATTACH DATABASE 'x' AS y\n", 9, "a query may not run ATTACH", "queries are read-only"},
		{"query without sql", head + onOK + "    queries:\n      q: {}\n", 8, "the statement is empty", "SELECT statement under sql:"},
		{"invalid query name", head + onOK + "    queries:\n      By Account:\n        sql: SELECT 1\n", 9, "the query name is not valid", "such as by_account"},

		// SQLite
		{"no such column", head + "    on:\n      Deposited: UPDATE balances SET balance = balanse WHERE account = :entity\n", 6,
			"no such column: balanse", "did you mean balance? the columns of balances are account, balance, events"},
		{"no such column in a query", head + onOK + "    queries:\n      q:\n        sql: SELECT b.acount FROM balances b\n", 9,
			"no such column: b.acount", "did you mean account?"},
		{"wrong alias", head + onOK + "    queries:\n      q:\n        sql: SELECT c.account FROM balances b\n", 9,
			"no such column: c.account", "check the table or alias before the dot"},
		{"no such table", head + "    on:\n      Deposited: UPDATE balance SET balance = 0 WHERE account = :entity\n", 6,
			"no such table: balance", "did you mean balances? the tables are balances"},
		{"unrelated table", head + "    on:\n      Deposited: DELETE FROM ledger\n", 6,
			"no such table: ledger", "declare ledger under tables:, or use one of balances"},
		{"syntax error", head + "    on:\n      Deposited: UPDATE balances SET WHERE account = :entity\n", 6,
			`near "WHERE": syntax error`, `correct the SQL near "WHERE"`},
		{"unterminated string", head + "    on:\n      Deposited: \"UPDATE balances SET account = 'x\"\n", 6,
			"unrecognized token", "close the string"},
		{"incomplete", head + "    on:\n      Deposited: DELETE FROM balances WHERE (\n", 6,
			"incomplete input", "complete the statement"},

		// tables
		{"not a declaration", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a)\n      - INSERT INTO t VALUES (1)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			5, "INSERT is not a declaration", "CREATE TABLE, CREATE [UNIQUE] INDEX and CREATE VIEW"},
		{"trigger", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a)\n      - CREATE TRIGGER x AFTER INSERT ON t BEGIN DELETE FROM t; END\n    on: {A: INSERT INTO t VALUES (1)}\n",
			5, "CREATE TRIGGER is not supported", "CREATE TABLE, CREATE [UNIQUE] INDEX and CREATE VIEW"},
		{"temporary table", "projections:\n  - name: b\n    tables:\n      - CREATE TEMP TABLE t (a)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, "temporary table", "drop TEMP"},
		{"other schema", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE temp.t (a)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, "the table is in schema temp", "drop the temp. prefix"},
		{"reserved _kuma", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE _kuma_position (a)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, "the name _kuma_position is reserved", "belong to Kuma and SQLite"},
		{"reserved quoted", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE IF NOT EXISTS main.\"_KUMA\" (a)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, "the name _KUMA is reserved", "belong to Kuma and SQLite"},
		{"reserved sqlite_", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a)\n      - CREATE UNIQUE INDEX sqlite_t ON t (a)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			5, "the name sqlite_t is reserved", "belong to Kuma and SQLite"},
		{"unique table", "projections:\n  - name: b\n    tables:\n      - CREATE UNIQUE TABLE t (a)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, "UNIQUE goes with INDEX only", "CREATE TABLE"},
		{"parameter in a table", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a DEFAULT :x)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, "parameter :x in a table declaration", "write the value into the statement"},
		{"table syntax", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a,)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			4, `near ")": syntax error`, `correct the SQL near ")"`},
		{"table declared twice", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a)\n      - CREATE TABLE t (b)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			5, "table t already exists", "declare each table, index and view once"},
		{"index on a missing column", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a)\n      - CREATE INDEX t_b ON t (b)\n    on: {A: INSERT INTO t VALUES (1)}\n",
			5, "no such column: b", "the columns of t are a"},
		{"view of a missing table", "projections:\n  - name: b\n    tables:\n      - CREATE TABLE t (a)\n      - CREATE VIEW v AS SELECT a FROM u\n    on: {A: INSERT INTO t VALUES (1)}\n",
			5, "no such table: u", "did you mean t?"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := compileYAML(t, tt.src)
			if err == nil {
				t.Fatalf("CompileAll = %v, want an error", got)
			}
			if got != nil {
				t.Errorf("CompileAll returned %v with an error", got)
			}
			wantError(t, err, tt.line, tt.problem, tt.fix)
			for _, e := range errorsOf(t, err) {
				if e.Fix == "" {
					t.Errorf("error %q has no fix", e)
				}
				if !strings.HasPrefix(e.Error(), "projections.yaml:") {
					t.Errorf("error %q does not start with the file name", e)
				}
			}
		})
	}
}

func TestCompileErrorMessage(t *testing.T) {
	src := head + `    on:
      Deposited: INSERT INTO balances (account, balance, events) VALUES (:entity, :amount, 1) ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance, events = events + 1
      Withdrawn: UPDATE balances SET balance = balance - amout, events = events + 1 WHERE account = :entity
`
	_, err := compileYAML(t, src)
	want := `projections.yaml:7: projection "balances": on Withdrawn: no such column: amout (fix: the columns of balances are account, balance, events)`
	if err == nil || err.Error() != want {
		t.Errorf("got  %v\nwant %s", err, want)
	}
	var perr *Error
	if !errors.As(err, &perr) {
		t.Fatalf("%v is not a *projection.Error", err)
	}
	if perr.File != "projections.yaml" || perr.Line != 7 || perr.Projection != "balances" || perr.Item != "on Withdrawn" {
		t.Errorf("got %+v", perr)
	}
}

// TestCompileReportsEveryProblem checks that one run reports all problems of
// a file, in reading order, across projections.
func TestCompileReportsEveryProblem(t *testing.T) {
	src := `projections:
  - name: balances
    tables:
      - CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER)
      - CREATE TABLE _kuma_x (a)
    queries:
      wipe:
        sql: DELETE FROM balances
    on:
      Deposited: UPDATE balances SET balance = amout WHERE account = :entity
      Withdrawn: SELECT 1
      Closed: DELETE FROM balances WHERE account = ?
    forget: DELETE FROM balances WHERE account = :account
  - name: Ledger
    tables: [CREATE TABLE ledger (id)]
    on:
      Deposited: INSERT INTO ledgr VALUES (:entity)
  - name: balances
    tables: [CREATE TABLE t (a)]
    on: {A: INSERT INTO t VALUES (1)}
`
	_, err := compileYAML(t, src)
	var lines []int
	for _, e := range errorsOf(t, err) {
		lines = append(lines, e.Line)
	}
	if want := []int{5, 8, 10, 11, 12, 13, 14, 17, 18}; !slices.Equal(lines, want) {
		t.Errorf("error lines = %v, want %v\n%v", lines, want, err)
	}
	wantError(t, err, 18, "the name is taken by the projection on line 2", "give each projection its own name")
}

// TestCompileFailedTableIsNotRepeated checks that statements using a table
// whose CREATE failed are not reported again as "no such table".
func TestCompileFailedTableIsNotRepeated(t *testing.T) {
	src := `projections:
  - name: b
    tables:
      - CREATE TABLE t (a,)
    on:
      A: INSERT INTO t VALUES (:entity)
    queries:
      q:
        sql: SELECT a FROM t
`
	_, err := compileYAML(t, src)
	if errs := errorsOf(t, err); len(errs) != 1 || errs[0].Line != 4 {
		t.Errorf("got %v, want only the error on line 4", err)
	}
}

func TestCompileGoSpec(t *testing.T) {
	s := Spec{
		Name:   "balances",
		Tables: []string{"CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER)"},
		On: map[string]string{
			"Deposited": "UPDATE balances SET balance = amout WHERE account = :entity",
			"Withdrawn": "UPDATE balances SET balance = balance - :amount WHERE account = :entity",
		},
		Forget: "DELETE FROM balances WHERE account = :x",
	}
	_, err := Compile(context.Background(), s)
	want := `projection "balances": on Deposited: no such column: amout (fix: the columns of balances are account, balance)` + "\n" +
		`projection "balances": forget: may use only :entity, not :x (fix: a forgotten entity has no event to bind; match its rows by :entity)`
	if err == nil || err.Error() != want {
		t.Errorf("got\n%v\nwant\n%s", err, want)
	}
}

func TestCompile(t *testing.T) {
	s := Spec{
		Name: "balances",
		Tables: []string{
			"CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0);",
			"create unique index if not exists balances_by_balance on balances (balance, account)",
			"CREATE VIEW rich AS SELECT * FROM balances WHERE balance > 1000",
		},
		On: map[string]string{
			"Deposited": "INSERT INTO balances (account, balance) VALUES (:entity, :amount)\n" +
				"ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance; -- upsert\n",
			AnyEvent: "WITH x AS (SELECT :entity AS a) UPDATE balances SET balance = balance WHERE account IN (SELECT a FROM x) /* touch */",
		},
		Forget: "  DELETE FROM balances WHERE account = :entity;",
		Queries: map[string]Query{
			"rich":    {SQL: "SELECT account FROM rich WHERE balance > :min AND balance < :max OR :min IS NULL;"},
			"listing": {SQL: "VALUES (1)"},
		},
	}
	c, err := Compile(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		st     *Statement
		sql    string
		params []string
	}{
		{"on Deposited", c.On["Deposited"],
			"INSERT INTO balances (account, balance) VALUES (:entity, :amount)\nON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance",
			[]string{"entity", "amount"}},
		{"on *", c.On[AnyEvent],
			"WITH x AS (SELECT :entity AS a) UPDATE balances SET balance = balance WHERE account IN (SELECT a FROM x)",
			[]string{"entity"}},
		{"forget", c.Forget, "DELETE FROM balances WHERE account = :entity", []string{"entity"}},
		{"query rich", c.Queries["rich"],
			"SELECT account FROM rich WHERE balance > :min AND balance < :max OR :min IS NULL", []string{"min", "max"}},
		{"query listing", c.Queries["listing"], "VALUES (1)", nil},
	}
	for _, tt := range tests {
		if tt.st == nil {
			t.Errorf("%s: not compiled", tt.name)
			continue
		}
		if tt.st.SQL != tt.sql {
			t.Errorf("%s: SQL = %q, want %q", tt.name, tt.st.SQL, tt.sql)
		}
		if !slices.Equal(tt.st.Params, tt.params) {
			t.Errorf("%s: Params = %q, want %q", tt.name, tt.st.Params, tt.params)
		}
	}
	if c.Spec.Name != "balances" || len(c.On) != 2 || len(c.Queries) != 2 {
		t.Errorf("got %+v", c)
	}

	s.Forget = ""
	if c, err := Compile(context.Background(), s); err != nil || c.Forget != nil {
		t.Errorf("without forget: Compile = %+v, %v; want a nil Forget", c, err)
	}
}

func TestCompileAllNames(t *testing.T) {
	a := Spec{Name: "a", Tables: []string{"CREATE TABLE t (x)"}, On: map[string]string{"A": "DELETE FROM t"}}
	b := a
	b.Name = "b"
	got, err := CompileAll(context.Background(), []Spec{a, b})
	if err != nil || len(got) != 2 || got[0].Spec.Name != "a" || got[1].Spec.Name != "b" {
		t.Fatalf("CompileAll = %v, %v", got, err)
	}
	_, err = CompileAll(context.Background(), []Spec{a, b, a})
	want := `projection "a": name: the name is taken by the projection specs[0] (fix: give each projection its own name)`
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}
}

func TestCompileCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s := Spec{Name: "a", Tables: []string{"CREATE TABLE t (x)"}, On: map[string]string{"A": "DELETE FROM t"}}
	if _, err := Compile(ctx, s); !errors.Is(err, context.Canceled) {
		t.Errorf("Compile = %v, want context.Canceled", err)
	}
	if _, err := CompileAll(ctx, []Spec{s}); !errors.Is(err, context.Canceled) {
		t.Errorf("CompileAll = %v, want context.Canceled", err)
	}
}

func TestCompileExampleFile(t *testing.T) {
	specs, err := Load("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := CompileAll(context.Background(), specs); err != nil {
		t.Fatal(err)
	}
}
