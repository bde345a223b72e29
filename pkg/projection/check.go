package projection

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/kumadb/kuma/pkg/kuma"
)

func (c *compiler) name() {
	s, at := c.spec, c.src().namePos()
	switch {
	case s.Name == "":
		c.fail(at, "", 0, "name", "the projection has no name", "add name: with a lowercase name such as balances")
	case s.Name == BuiltinName:
		c.fail(at, "", 0, "name", "entities is the built-in projection", "choose another name")
	case !ValidName(s.Name):
		c.fail(at, "", 0, "name", fmt.Sprintf("%q is not a valid name", s.Name),
			"use 1 to 63 lowercase letters, digits or _, starting with a letter, such as "+suggestName(s.Name))
	}
}

func (c *compiler) tables(ctx context.Context) {
	if len(c.spec.Tables) == 0 {
		c.fail(c.src().item, "", 0, "tables", "the projection declares no tables",
			"add tables: with at least one CREATE TABLE statement")
		return
	}
	type view struct {
		it   item
		name string
	}
	var views []view
	for i, text := range c.spec.Tables {
		it := item{label: fmt.Sprintf("tables[%d]", i), at: c.src().tablePos(i), sql: text, role: roleTable}
		toks, body, lexed := c.lex(it)
		if len(toks) == 0 {
			continue
		}
		kind, name, ok := c.ddl(it, toks)
		for _, t := range firstParams(toks) {
			c.fail(it.at, it.sql, t.pos, it.label, "parameter "+t.text+" in a table declaration",
				"tables are created before any event arrives; write the value into the statement")
			ok = false
		}
		if !ok || !lexed {
			if name != "" {
				c.failed[strings.ToLower(name)] = true
			}
			continue
		}
		if _, err := c.conn.ExecContext(ctx, body); err != nil {
			c.failed[strings.ToLower(name)] = true
			c.sqlError(ctx, it, toks, err)
			continue
		}
		c.schemaLoaded = false // a fix lists the tables created so far
		if kind == "VIEW" {
			views = append(views, view{it, name})
		}
	}
	// SQLite resolves a view's tables when the view is used, not when it is
	// created, so use each one once every table exists.
	for _, v := range views {
		q := `SELECT * FROM "` + strings.ReplaceAll(v.name, `"`, `""`) + `"`
		st, err := c.conn.PrepareContext(ctx, q)
		if err != nil {
			c.sqlError(ctx, v.it, scan(v.it.sql), err)
			continue
		}
		st.Close()
	}
}

// ddl checks that a table statement creates a table, an index or a view
// under a name that is free to take, and returns what and which name.
func (c *compiler) ddl(it item, toks []token) (kind, name string, ok bool) {
	const fix = "tables take CREATE TABLE, CREATE [UNIQUE] INDEX and CREATE VIEW statements; changes go under on:"
	bad := func(t token, problem, fix string) (string, string, bool) {
		c.fail(it.at, it.sql, t.pos, it.label, problem, fix)
		return kind, name, false
	}
	if !toks[0].is("CREATE") {
		return bad(toks[0], fmt.Sprintf("%s is not a declaration", strings.ToUpper(toks[0].text)), fix)
	}
	i := 1
	if i < len(toks) && toks[i].is("UNIQUE") {
		i++
		if i < len(toks) && !toks[i].is("INDEX") {
			return bad(toks[i], "UNIQUE goes with INDEX only", fix)
		}
	}
	if i >= len(toks) {
		return bad(toks[i-1], "the statement ends after "+toks[i-1].text, fix)
	}
	switch t := toks[i]; {
	case t.is("TABLE"), t.is("INDEX"), t.is("VIEW"):
		kind = strings.ToUpper(t.text)
	case t.is("TEMP"), t.is("TEMPORARY"):
		return bad(t, "a temporary table does not outlive its connection", "drop "+strings.ToUpper(t.text)+": the read model is a file of its own")
	default:
		return bad(t, fmt.Sprintf("CREATE %s is not supported", strings.ToUpper(t.text)), fix)
	}
	i++
	if i+2 < len(toks) && toks[i].is("IF") && toks[i+1].is("NOT") && toks[i+2].is("EXISTS") {
		i += 3
	}
	if i >= len(toks) || toks[i].kind != tokWord && toks[i].kind != tokQuoted {
		return kind, "", true // SQLite names the problem better
	}
	at := toks[i]
	name = unquote(at)
	if i+2 < len(toks) && toks[i+1].kind == tokPunct && toks[i+1].text == "." {
		if !strings.EqualFold(name, "main") {
			return bad(at, fmt.Sprintf("the %s is in schema %s", strings.ToLower(kind), name),
				"drop the "+at.text+". prefix: the read model is one database")
		}
		at = toks[i+2]
		name = unquote(at)
	}
	if reserved(name) {
		return bad(at, fmt.Sprintf("the name %s is reserved", name),
			"names starting with _kuma or sqlite_ belong to Kuma and SQLite; choose another")
	}
	return kind, name, true
}

func reserved(name string) bool {
	n := strings.ToLower(name)
	return strings.HasPrefix(n, "_kuma") || strings.HasPrefix(n, "sqlite_")
}

func (c *compiler) events(ctx context.Context, out *Compiled) {
	if len(c.spec.On) == 0 {
		c.fail(c.src().item, "", 0, "on", "the projection handles no events",
			"add on: and map at least one event type to a statement, such as Deposited: INSERT ...")
		return
	}
	for _, typ := range c.sortedKeys(c.spec.On, c.src().on) {
		label := "on " + typ
		if typ != AnyEvent {
			if err := kuma.ValidateEventType(typ); err != nil {
				label = "on " + fmt.Sprintf("%q", typ)
				c.fail(c.src().onPos(typ), "", 0, label, kuma.AsError(err).Message,
					`use the event type exactly as events are appended, or "*" for every other type`)
			}
		}
		st := c.statement(ctx, item{label: label, at: c.src().onPos(typ), sql: c.spec.On[typ], role: roleEvent})
		if st != nil {
			out.On[typ] = st
		}
	}
}

func (c *compiler) queries(ctx context.Context, out *Compiled) {
	sqls := make(map[string]string, len(c.spec.Queries))
	for name, q := range c.spec.Queries {
		sqls[name] = q.SQL
	}
	for _, name := range c.sortedKeys(sqls, c.src().queries) {
		label := "query " + name
		at := c.src().queryPos(name)
		if !ValidName(name) {
			label = fmt.Sprintf("query %q", name)
			c.fail(at, "", 0, label, "the query name is not valid",
				"use 1 to 63 lowercase letters, digits or _, starting with a letter, such as "+suggestName(name))
		}
		if st := c.statement(ctx, item{label: label, at: at, sql: sqls[name], role: roleQuery}); st != nil {
			out.Queries[name] = st
		}
	}
}

// sortedKeys orders the keys of m by declaration, then by name, so that
// problems are found in reading order.
func (c *compiler) sortedKeys(m map[string]string, at map[string]pos) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		return cmp.Or(cmp.Compare(at[a].line, at[b].line), strings.Compare(a, b))
	})
	return keys
}
