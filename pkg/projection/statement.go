package projection

import (
	"cmp"
	"context"
	"fmt"
	"strings"
)

// statement checks one statement of an event, forget or query and prepares
// it; it returns nil after reporting a problem.
func (c *compiler) statement(ctx context.Context, it item) *Statement {
	// Every check runs, and so does SQLite, even after a problem: the
	// point is to report them all at once.
	toks, body, ok := c.lex(it)
	if len(toks) == 0 {
		return nil
	}
	params := ParamNames(body)
	switch v := verb(toks); it.role {
	case roleEvent, roleForget:
		what := "a statement for an event "
		if it.role == roleForget {
			what = "" // the label says forget already
		}
		switch v {
		case "INSERT", "UPDATE", "DELETE", "REPLACE":
		case "SELECT", "VALUES":
			c.fail(it.at, it.sql, toks[0].pos, it.label, what+"must change the read model",
				"use INSERT, UPDATE, DELETE or REPLACE; reads belong under queries:")
			ok = false
		default:
			c.fail(it.at, it.sql, toks[0].pos, it.label, fmt.Sprintf("%smay not run %s", what, describe(v)),
				"use INSERT, UPDATE, DELETE or REPLACE; declare tables under tables:")
			ok = false
		}
		if it.role == roleForget {
			for _, t := range firstParams(toks) {
				if t.text != ":"+ParamEntity {
					c.fail(it.at, it.sql, t.pos, it.label,
						fmt.Sprintf("may use only :entity, not %s", t.text),
						"a forgotten entity has no event to bind; match its rows by :entity")
					ok = false
				}
			}
		}
	case roleQuery:
		if v != "SELECT" && v != "VALUES" {
			c.fail(it.at, it.sql, toks[0].pos, it.label, fmt.Sprintf("a query may not run %s", describe(v)),
				"queries are read-only: start with SELECT or WITH")
			ok = false
		}
	}
	st, err := c.conn.PrepareContext(ctx, body)
	if err != nil {
		c.sqlError(ctx, it, toks, err)
		return nil
	}
	st.Close()
	if !ok {
		return nil
	}
	return &Statement{SQL: body, Params: params}
}

// firstParams returns the first :name token of each parameter.
func firstParams(toks []token) []token {
	var out []token
	seen := map[string]bool{}
	for _, t := range toks {
		if t.kind == tokParam && !seen[t.text] {
			seen[t.text] = true
			out = append(out, t)
		}
	}
	return out
}

func describe(verb string) string {
	if verb == "" {
		return "that statement"
	}
	return verb
}

// lex runs the checks on the text of any statement: there is one statement
// and it names its parameters :name. It returns the statement's tokens and
// its text without the trailing semicolon and comments.
func (c *compiler) lex(it item) (toks []token, body string, ok bool) {
	toks, extra := split(scan(it.sql))
	if len(toks) == 0 {
		fix := "write one SQL statement"
		switch it.role {
		case roleQuery:
			fix = "write one SELECT statement under sql:"
		case roleTable:
			fix = "write one CREATE statement, or remove the item"
		}
		c.fail(it.at, "", 0, it.label, "the statement is empty", fix)
		return nil, "", false
	}
	ok = true
	if extra != nil {
		fix := "keep one statement here"
		switch it.role {
		case roleTable:
			fix = `put each statement in an item of its own, "- CREATE ..."`
		case roleEvent:
			fix = "one statement per event type: fold the work into one (INSERT ... ON CONFLICT DO UPDATE, UPDATE ... FROM)"
		}
		c.fail(it.at, it.sql, extra.pos, it.label, "more than one statement", fix)
		ok = false
	}
	for _, t := range toks {
		if t.kind == tokParam && t.text[1] == '_' {
			// database/sql refuses such a name in sql.Named.
			name := cmp.Or(strings.TrimLeft(t.text[1:], "_"), "name")
			fix := "start the name with a letter, such as :" + name
			if it.role == roleEvent {
				fix += "; reach a data field named " + t.text[1:] + " with json_extract(:data, '$." + t.text[1:] + "')"
			}
			c.fail(it.at, it.sql, t.pos, it.label, fmt.Sprintf("parameter %s cannot be bound", t.text), fix)
			ok = false
		}
		if t.kind != tokBadParam {
			continue
		}
		fix := "use :name"
		if name := t.text[1:]; t.text[0] != '?' && t.text[0] != ':' && validParamName(name) {
			fix = "use :" + name
		}
		c.fail(it.at, it.sql, t.pos, it.label, fmt.Sprintf("parameter %s is not supported", t.text), fix)
		ok = false
	}
	return toks, strings.TrimSpace(it.sql[:toks[len(toks)-1].end()]), ok
}

func validParamName(s string) bool {
	if s == "" || !isNameStart(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if !isNameStart(s[i]) && !isDigit(s[i]) {
			return false
		}
	}
	return true
}
