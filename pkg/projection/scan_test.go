package projection

import (
	"slices"
	"testing"
)

func TestParamNames(t *testing.T) {
	tests := []struct {
		name string
		sql  string
		want []string
	}{
		{"none", "SELECT 1", nil},
		{"order of first appearance", "SELECT :b, :a, :b, :c", []string{"b", "a", "c"}},
		{"underscore and digits", "SELECT :_x1, :a_2", []string{"_x1", "a_2"}},
		{"adjacent punctuation", "VALUES(:a,:b)", []string{"a", "b"}},
		{"case matters", "SELECT :a, :A", []string{"a", "A"}},
		{"string literal", "SELECT 'a:b', :c", []string{"c"}},
		{"escaped quote in string", "SELECT 'it''s :not', :yes", []string{"yes"}},
		{"double-quoted identifier", `SELECT "a:b" FROM t WHERE x = :x`, []string{"x"}},
		{"doubled double quote", `SELECT "a"":b" FROM t`, nil},
		{"bracket identifier", "SELECT [a:b] FROM t", nil},
		{"backtick identifier", "SELECT `a:b`, `x``:y` FROM t", nil},
		{"line comment", "SELECT 1 -- :no\n, :yes", []string{"yes"}},
		{"line comment at end", "SELECT :yes -- :no", []string{"yes"}},
		{"block comment", "SELECT /* :no */ :yes", []string{"yes"}},
		{"unterminated block comment", "SELECT :yes /* :no", []string{"yes"}},
		{"unterminated string", "SELECT :yes, ':no", []string{"yes"}},
		{"double colon is not a parameter", "SELECT a::text", nil},
		{"double colon before name", "SELECT ::a", nil},
		{"triple colon", "SELECT :::a", nil},
		{"tcl namespace is not a plain parameter", "SELECT :a::b", nil},
		{"tcl array is not a plain parameter", "SELECT :a(x)", nil},
		{"colon and digit is not a name", "SELECT :1", nil},
		{"lone colon", "SELECT : a", nil},
		{"dollar inside a name", "SELECT :a$b", nil},
		{"other forms are not listed", "SELECT ?, ?1, @a, $b, #c, :d", []string{"d"}},
		{"blob literal", "SELECT x':a', :b", []string{"b"}},
		{"after semicolon", "SELECT :a; SELECT :b", []string{"a", "b"}},
		{"slash alone", "SELECT 4 / :a", []string{"a"}},
		{"minus alone", "SELECT 4 - :a", []string{"a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ParamNames(tt.sql); !slices.Equal(got, tt.want) {
				t.Errorf("ParamNames(%q) = %q, want %q", tt.sql, got, tt.want)
			}
		})
	}
}

func TestScanBadParams(t *testing.T) {
	tests := []struct {
		sql  string
		want []string // the text of each tokBadParam
	}{
		{"SELECT ?", []string{"?"}},
		{"SELECT ?12", []string{"?12"}},
		{"SELECT @amount", []string{"@amount"}},
		{"SELECT $amount", []string{"$amount"}},
		{"SELECT #amount", []string{"#amount"}},
		{"SELECT :1", []string{":1"}},
		{"SELECT :a::b", []string{":a::b"}},
		{"SELECT :a(x)", []string{":a(x)"}},
		{"SELECT :::a", []string{":::a"}},
		{"SELECT '?', \"@a\", -- $b\n 1", nil},
		{"SELECT a$b, a::b, :ok", nil},
	}
	for _, tt := range tests {
		var got []string
		for _, tok := range scan(tt.sql) {
			if tok.kind == tokBadParam {
				got = append(got, tok.text)
			}
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("bad parameters of %q = %q, want %q", tt.sql, got, tt.want)
		}
	}
}

func TestSplit(t *testing.T) {
	tests := []struct {
		sql   string
		extra string // text of the first token of a second statement
	}{
		{"SELECT 1", ""},
		{"SELECT 1;", ""},
		{"SELECT 1 ;  \n", ""},
		{"SELECT 1; -- done", ""},
		{"SELECT 1; /* done */", ""},
		{"SELECT 1;;", ""},
		{"SELECT ';'", ""},
		{"SELECT 1; SELECT 2", "SELECT"},
		{"SELECT 1; x", "x"},
		{"SELECT 1;; DELETE FROM t", "DELETE"},
	}
	for _, tt := range tests {
		_, extra := split(scan(tt.sql))
		got := ""
		if extra != nil {
			got = extra.text
		}
		if got != tt.extra {
			t.Errorf("split(%q): second statement starts with %q, want %q", tt.sql, got, tt.extra)
		}
	}
}

func TestVerb(t *testing.T) {
	tests := []struct{ sql, want string }{
		{"select 1", "SELECT"},
		{"  -- why\n /* c */ Insert INTO t VALUES (1)", "INSERT"},
		{"WITH x AS (SELECT 1) SELECT * FROM x", "SELECT"},
		{"WITH x(a, b) AS (SELECT 1, 2) DELETE FROM t WHERE a IN (SELECT a FROM x)", "DELETE"},
		{"WITH RECURSIVE x AS (SELECT 1 UNION ALL SELECT 1 FROM x), y AS NOT MATERIALIZED (SELECT 2) UPDATE t SET a = 1", "UPDATE"},
		{"WITH replace AS (SELECT 1) DELETE FROM t", "DELETE"},
		{"WITH select_x AS (SELECT (1)) SELECT 1", "SELECT"},
		{"(SELECT 1)", ""},
		{"", ""},
	}
	for _, tt := range tests {
		if got := verb(scan(tt.sql)); got != tt.want {
			t.Errorf("verb(%q) = %q, want %q", tt.sql, got, tt.want)
		}
	}
}

func TestEditDistance(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"", "", 0},
		{"abc", "", 3},
		{"tables", "tables", 0},
		{"tabels", "tables", 1}, // a swap counts once
		{"amout", "amount", 1},
		{"forgett", "forget", 1},
		{"querys", "queries", 2},
		{"kitten", "sitting", 3},
	}
	for _, tt := range tests {
		if got := editDistance(tt.a, tt.b); got != tt.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
	}
	if got := closest("amout", []string{"account", "balance", "events"}); got != "" {
		t.Errorf("closest(amout) = %q, want no suggestion", got)
	}
	if got := closest("Balanse", []string{"account", "balance"}); got != "balance" {
		t.Errorf("closest(Balanse) = %q, want balance", got)
	}
}
