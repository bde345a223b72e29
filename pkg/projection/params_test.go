package projection

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
)

// openDB opens a SQLite database in a file of its own, as the engine will.
func openDB(t *testing.T, tables ...string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+t.TempDir()+"/read.db")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, ddl := range tables {
		if _, err := db.Exec(ddl); err != nil {
			t.Fatal(err)
		}
	}
	return db
}

// roundTrip stores the arguments of st in a column without affinity, which
// keeps each value's storage class, and reads the value and class back.
func roundTrip(t *testing.T, db *sql.DB, st *Statement, args []any) (v any, class string) {
	t.Helper()
	if _, err := db.Exec("DELETE FROM t"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(st.SQL, args...); err != nil {
		t.Fatalf("%s: %v", st.SQL, err)
	}
	if err := db.QueryRow("SELECT v, typeof(v) FROM t").Scan(&v, &class); err != nil {
		t.Fatal(err)
	}
	return v, class
}

func compileOne(t *testing.T, table, on string) *Statement {
	t.Helper()
	c, err := Compile(context.Background(), Spec{Name: "p", Tables: []string{table}, On: map[string]string{"E": on}})
	if err != nil {
		t.Fatal(err)
	}
	return c.On["E"]
}

func TestBindEventFields(t *testing.T) {
	const table = "CREATE TABLE t (v)"
	db := openDB(t, table)
	st := compileOne(t, table, "INSERT INTO t (v) VALUES (:x)")
	tests := []struct {
		name  string
		data  string
		want  any
		class string
	}{
		{"string", `{"x": "hello"}`, "hello", "text"},
		{"escaped string", `{"x": "a\"b\u00e9"}`, `a"bé`, "text"},
		{"empty string", `{"x": ""}`, "", "text"},
		{"integer", `{"x": 42}`, int64(42), "integer"},
		{"negative", `{"x": -7}`, int64(-7), "integer"},
		{"beyond 2^53", `{"x": 9007199254740993}`, int64(9007199254740993), "integer"},
		{"max int64", `{"x": 9223372036854775807}`, int64(math.MaxInt64), "integer"},
		{"min int64", `{"x": -9223372036854775808}`, int64(math.MinInt64), "integer"},
		{"beyond int64", `{"x": 9223372036854775808}`, 9223372036854775808.0, "real"},
		{"fraction", `{"x": 1.5}`, 1.5, "real"},
		{"whole with fraction", `{"x": 12.0}`, int64(12), "integer"},
		{"whole with exponent", `{"x": 1.25e2}`, int64(125), "integer"},
		{"big whole with exponent", `{"x": 9.007199254740993E15}`, int64(9007199254740993), "integer"},
		{"small exponent", `{"x": 1e-2}`, 0.01, "real"},
		{"zero", `{"x": -0.0}`, int64(0), "integer"},
		{"huge exponent", `{"x": 1e400}`, math.Inf(1), "real"},
		{"true", `{"x": true}`, int64(1), "integer"},
		{"false", `{"x": false}`, int64(0), "integer"},
		{"null", `{"x": null}`, nil, "null"},
		{"missing", `{"y": 1}`, nil, "null"},
		{"object", `{"x": {"a": 1,  "b": [1, 2]}}`, `{"a":1,"b":[1,2]}`, "text"},
		{"array", `{"x": [ 1, "two" ]}`, `[1,"two"]`, "text"},
		{"data is null", `null`, nil, "null"},
		{"data is an array", `[{"x": 1}]`, nil, "null"},
		{"data is a string", `"x"`, nil, "null"},
		{"data is a number", `5`, nil, "null"},
		{"no data", ``, nil, "null"},
		{"spaces around data", " \n {\"x\": 3} \n", int64(3), "integer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args, err := st.BindEvent(Event{Entity: "a1", Type: "E", Data: json.RawMessage(tt.data)})
			if err != nil {
				t.Fatal(err)
			}
			got, class := roundTrip(t, db, st, args)
			if got != tt.want || class != tt.class {
				t.Errorf("data %s: got %#v (%s), want %#v (%s)", tt.data, got, class, tt.want, tt.class)
			}
		})
	}
}

func TestBindEventReserved(t *testing.T) {
	const table = "CREATE TABLE ev (entity, version, time, position, type, data, amount)"
	db := openDB(t, table)
	c, err := Compile(context.Background(), Spec{Name: "p", Tables: []string{table},
		On: map[string]string{AnyEvent: "INSERT INTO ev VALUES (:entity, :version, :time, :position, :type, :data, :amount)"}})
	if err != nil {
		t.Fatal(err)
	}
	st := c.On[AnyEvent]
	paris := time.FixedZone("CET", 3600)
	ev := Event{
		Entity:   "acc-1",
		Version:  9007199254740993,
		Time:     time.Date(2026, 11, 25, 15, 3, 7, 123456000, paris),
		Position: "p1.3.1042",
		Type:     "Deposited",
		Data:     json.RawMessage(`{"amount": 9007199254740993, "note": "x"}`),
	}
	args, err := st.BindEvent(ev)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, a := range args {
		names = append(names, a.(sql.NamedArg).Name)
	}
	if want := []string{"entity", "version", "time", "position", "type", "data", "amount"}; !slices.Equal(names, want) {
		t.Errorf("argument names = %q, want %q", names, want)
	}
	if _, err := db.Exec(st.SQL, args...); err != nil {
		t.Fatal(err)
	}
	var (
		entity, tm, position, typ, data string
		version, amount                 int64
	)
	err = db.QueryRow("SELECT entity, version, time, position, type, data, amount FROM ev").
		Scan(&entity, &version, &tm, &position, &typ, &data, &amount)
	if err != nil {
		t.Fatal(err)
	}
	got := []any{entity, version, tm, position, typ, data, amount}
	want := []any{"acc-1", int64(9007199254740993), "2026-11-25T14:03:07.123456Z", "p1.3.1042", "Deposited",
		`{"amount": 9007199254740993, "note": "x"}`, int64(9007199254740993)}
	if !slices.Equal(got, want) {
		t.Errorf("stored %v, want %v", got, want)
	}
	// SQLite reads :data as JSON.
	var note string
	if err := db.QueryRow("SELECT json_extract(data, '$.note') FROM ev").Scan(&note); err != nil || note != "x" {
		t.Errorf("json_extract = %q, %v; want x", note, err)
	}
}

func TestBindEventBadData(t *testing.T) {
	reserved := &Statement{SQL: "…", Params: []string{"entity", "data"}}
	field := &Statement{SQL: "…", Params: []string{"entity", "amount"}}
	for _, data := range []string{`{"amount":`, `nope`, `{"amount": 1} x`} {
		ev := Event{Entity: "a", Type: "E", Position: "p1.1.1", Data: json.RawMessage(data)}
		// Data is decoded only for a parameter that names a field.
		if _, err := reserved.BindEvent(ev); err != nil {
			t.Errorf("data %q with reserved parameters only: %v", data, err)
		}
		if _, err := field.BindEvent(ev); err == nil || !strings.Contains(err.Error(), "p1.1.1") {
			t.Errorf("data %q: err = %v, want an error naming the position", data, err)
		}
	}
}

func TestBindQuery(t *testing.T) {
	const table = "CREATE TABLE t (v)"
	db := openDB(t, table)
	c, err := Compile(context.Background(), Spec{Name: "p", Tables: []string{table},
		On:      map[string]string{"E": "INSERT INTO t VALUES (1)"},
		Queries: map[string]Query{"q": {SQL: "SELECT :x AS v, typeof(:x)"}}})
	if err != nil {
		t.Fatal(err)
	}
	st := c.Queries["q"]
	tests := []struct {
		raw   string
		want  any
		class string
	}{
		{`"acc-1"`, "acc-1", "text"},
		{`9007199254740993`, int64(9007199254740993), "integer"},
		{` -12 `, int64(-12), "integer"},
		{`2.5`, 2.5, "real"},
		{`1e2`, int64(100), "integer"},
		{`true`, int64(1), "integer"},
		{`false`, int64(0), "integer"},
		{`null`, nil, "null"},
	}
	for _, tt := range tests {
		args, err := st.BindQuery(map[string]json.RawMessage{"x": json.RawMessage(tt.raw)})
		if err != nil {
			t.Errorf("%s: %v", tt.raw, err)
			continue
		}
		var (
			got   any
			class string
		)
		if err := db.QueryRow(st.SQL, args...).Scan(&got, &class); err != nil {
			t.Fatal(err)
		}
		if got != tt.want || class != tt.class {
			t.Errorf("%s: got %#v (%s), want %#v (%s)", tt.raw, got, class, tt.want, tt.class)
		}
	}
}

func TestBindQueryErrors(t *testing.T) {
	st := &Statement{SQL: "SELECT :account, :since", Params: []string{"account", "since"}}
	none := &Statement{SQL: "SELECT 1"}
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	many := map[string]json.RawMessage{}
	for _, k := range []string{"a", "b", "c", "d", "e", "f", "g"} {
		many[k] = raw("1")
	}
	tests := []struct {
		name   string
		st     *Statement
		params map[string]json.RawMessage
		want   []string // each must appear in the message
	}{
		{"missing", st, map[string]json.RawMessage{"account": raw(`"a"`)},
			[]string{`missing parameter "since"`, "the query takes account, since"}},
		{"nil map", st, nil, []string{`missing parameter "account"`, `missing parameter "since"`}},
		{"unknown", st, map[string]json.RawMessage{"account": raw(`"a"`), "since": raw(`1`), "acount": raw(`1`)},
			[]string{`unknown parameter "acount" (did you mean "account"?)`}},
		{"unknown only", none, map[string]json.RawMessage{"x": raw(`1`)},
			[]string{`unknown parameter "x"`, "the query takes no parameters"}},
		{"many unknown", none, many, []string{`unknown parameter "e"`, "2 more unknown parameters"}},
		{"object", st, map[string]json.RawMessage{"account": raw(`{"a": 1}`), "since": raw(`1`)},
			[]string{`parameter "account" must be a string, number, boolean or null`}},
		{"array", st, map[string]json.RawMessage{"account": raw(`"a"`), "since": raw(`[1]`)},
			[]string{`parameter "since" must be a string, number, boolean or null`}},
		{"not JSON", st, map[string]json.RawMessage{"account": raw(`"a"`), "since": raw(`yesterday`)},
			[]string{`parameter "since" is not valid JSON`}},
		{"empty", st, map[string]json.RawMessage{"account": raw(``), "since": raw(`1`)},
			[]string{`parameter "account" is not valid JSON`}},
		{"bad string", st, map[string]json.RawMessage{"account": raw(`"a`), "since": raw(`1`)},
			[]string{`parameter "account" is not valid JSON`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args, err := tt.st.BindQuery(tt.params)
			if err == nil {
				t.Fatalf("BindQuery = %v, want an error", args)
			}
			if !errors.Is(err, kuma.ErrBadRequest) {
				t.Errorf("error %v is not bad_request", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestParamNamesAgreeWithSQLite checks that SQLite binds exactly the names
// ParamNames reports: modernc.org/sqlite fails on a parameter it cannot find
// among the arguments.
func TestParamNamesAgreeWithSQLite(t *testing.T) {
	db := openDB(t, "CREATE TABLE t (a, [b:c], \"d:e\")")
	for _, q := range []string{
		"SELECT :a, :b, :a",
		"SELECT ':x', :y -- :z",
		"SELECT [b:c], \"d:e\" FROM t WHERE :p IS NULL /* :q */",
		"SELECT :x_1, :X2",
		"WITH w AS (SELECT :w AS c) SELECT c FROM w",
	} {
		var args []any
		for _, name := range ParamNames(q) {
			args = append(args, sql.Named(name, nil))
		}
		rows, err := db.Query(q, args...)
		if err != nil {
			t.Errorf("%s with %q: %v", q, ParamNames(q), err)
			continue
		}
		rows.Close()
	}
}

func TestReservedParams(t *testing.T) {
	got := ReservedParams()
	if want := []string{"entity", "version", "time", "position", "type", "data"}; !slices.Equal(got, want) {
		t.Errorf("ReservedParams() = %q, want %q", got, want)
	}
	got[0] = "changed"
	if ReservedParams()[0] != "entity" {
		t.Error("ReservedParams shares its slice")
	}
}
