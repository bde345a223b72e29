package projection

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"modernc.org/sqlite" // also registers the "sqlite" driver
)

// sqliteCode matches the " (1)" result code modernc.org/sqlite appends.
var sqliteCode = regexp.MustCompile(` \(\d+\)$`)

// sqlError reports an error from SQLite with a fix for the common cases.
func (c *compiler) sqlError(ctx context.Context, it item, toks []token, err error) {
	if ctx.Err() != nil {
		return // Compile reports the cancellation
	}
	msg := err.Error()
	var serr *sqlite.Error
	if errors.As(err, &serr) {
		// "SQL logic error: no such column: x (1)": the generic words of
		// the result code say nothing the message does not.
		msg = sqliteCode.ReplaceAllString(msg, "")
		if i := strings.Index(msg, ": "); i >= 0 {
			msg = msg[i+2:]
		}
	}
	fix := "correct the statement so that SQLite accepts it"
	switch {
	case strings.HasPrefix(msg, "no such column: "):
		fix = c.columnFix(ctx, strings.TrimPrefix(msg, "no such column: "), toks)
	case strings.HasPrefix(msg, "no such table: "):
		// SQLite qualifies the tables a view names.
		name := strings.TrimPrefix(strings.TrimPrefix(msg, "no such table: "), "main.")
		msg = "no such table: " + name
		if c.failed[strings.ToLower(name)] {
			return // its CREATE failed, and that is reported already
		}
		fix = c.tableFix(ctx, name)
	case strings.HasPrefix(msg, "near "):
		if i := strings.LastIndex(msg, ": "); i > 0 {
			fix = "correct the SQL " + msg[:i]
		}
	case strings.Contains(msg, "already exists"):
		fix = "declare each table, index and view once"
	case strings.HasPrefix(msg, "object name reserved"):
		fix = "names starting with _kuma or sqlite_ belong to Kuma and SQLite; choose another"
	case strings.HasPrefix(msg, "unrecognized token"):
		fix = "close the string or quoted name, or remove the stray character"
	case msg == "incomplete input":
		fix = "complete the statement"
	}
	c.fail(it.at, "", 0, it.label, msg, fix)
}

func (c *compiler) columnFix(ctx context.Context, column string, toks []token) string {
	rels := c.relations(ctx)
	if len(rels) == 0 {
		return "declare the column in a table under tables:"
	}
	// The tables the statement names, or all of them when it names none
	// (a column of a CTE, say).
	var named []relation
	for _, r := range rels {
		for _, t := range toks {
			if (t.kind == tokWord || t.kind == tokQuoted) && strings.EqualFold(unquote(t), r.name) {
				named = append(named, r)
				break
			}
		}
	}
	if len(named) == 0 {
		named = rels
	}
	base := column
	if i := strings.LastIndexByte(column, '.'); i >= 0 {
		base = column[i+1:]
	}
	var all, lists []string
	for _, r := range named {
		all = append(all, r.columns...)
		lists = append(lists, fmt.Sprintf("the columns of %s are %s", r.name, strings.Join(r.columns, ", ")))
	}
	fix := strings.Join(lists, "; ")
	switch near := closest(base, all); {
	case near == "":
	case strings.EqualFold(near, base):
		fix = "check the table or alias before the dot in " + column + "; " + fix
	default:
		fix = "did you mean " + near + "? " + fix
	}
	return fix
}

func (c *compiler) tableFix(ctx context.Context, table string) string {
	var names []string
	for _, r := range c.relations(ctx) {
		names = append(names, r.name)
	}
	if len(names) == 0 {
		return "declare " + table + " under tables:"
	}
	list := strings.Join(names, ", ")
	if near := closest(table, names); near != "" {
		return "did you mean " + near + "? the tables are " + list
	}
	return "declare " + table + " under tables:, or use one of " + list
}

// relations lists the declared tables and views and their columns, in
// declaration order. A failure here only makes a fix less helpful, so it is
// not reported.
func (c *compiler) relations(ctx context.Context) []relation {
	if c.schemaLoaded {
		return c.schema
	}
	c.schemaLoaded, c.schema = true, nil
	rows, err := c.conn.QueryContext(ctx,
		`SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\_%' ESCAPE '\' ORDER BY rowid`)
	if err != nil {
		return nil
	}
	var names []string
	for rows.Next() {
		var n string
		if rows.Scan(&n) == nil {
			names = append(names, n)
		}
	}
	rows.Close()
	for _, n := range names {
		r := relation{name: n}
		if rows, err := c.conn.QueryContext(ctx, `SELECT name FROM pragma_table_info(?) ORDER BY cid`, n); err == nil {
			for rows.Next() {
				var col string
				if rows.Scan(&col) == nil {
					r.columns = append(r.columns, col)
				}
			}
			rows.Close()
		}
		c.schema = append(c.schema, r)
	}
	return c.schema
}
