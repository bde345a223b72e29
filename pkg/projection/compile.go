package projection

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/kumadb/kuma/pkg/kuma"
	"modernc.org/sqlite" // also registers the "sqlite" driver
)

// AnyEvent is the key of Spec.On whose statement runs for every event type
// that has no statement of its own.
const AnyEvent = "*"

// BuiltinName is the name of the built-in projection, which a Spec may not
// take.
const BuiltinName = "entities"

// Compile checks s and prepares it for the engine. Every statement is
// prepared against a scratch in-memory SQLite database holding the declared
// tables, so unknown tables and columns and syntax errors are caught here,
// at start, rather than at the first event. Every problem is reported, each
// as an [*Error] joined with errors.Join; any other error (ctx done, SQLite
// unavailable) is returned as is. Compile is safe for concurrent use: each
// call has a scratch database of its own.
func Compile(ctx context.Context, s Spec) (*Compiled, error) {
	db, err := sql.Open("sqlite", ":memory:")
	if err != nil {
		return nil, fmt.Errorf("projection %q: scratch database: %w", s.Name, err)
	}
	defer db.Close()
	// Each connection to ":memory:" is a database of its own: pin one.
	db.SetMaxOpenConns(1)
	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("projection %q: scratch database: %w", s.Name, err)
	}
	defer conn.Close()

	c := &compiler{spec: &s, conn: conn, failed: map[string]bool{}}
	out := &Compiled{Spec: s, On: map[string]*Statement{}, Queries: map[string]*Statement{}}
	c.name()
	c.tables(ctx)
	c.events(ctx, out)
	if s.Forget != "" {
		out.Forget = c.statement(ctx, item{label: "forget", at: c.src().forgetPos(), sql: s.Forget, role: roleForget})
	}
	c.queries(ctx, out)

	// A cancelled ctx makes SQLite fail in ways that are not the
	// declaration's fault; report the cancellation alone.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(c.errs) > 0 {
		return nil, errors.Join(sortByLine(c.errs)...)
	}
	return out, nil
}

// CompileAll compiles every spec and checks that their names are unique. It
// reports the problems of all of them together, in the order of the specs;
// on any problem it returns no Compiled. The result is in the order of specs.
func CompileAll(ctx context.Context, specs []Spec) ([]*Compiled, error) {
	var errs []error
	out := make([]*Compiled, 0, len(specs))
	first := map[string]int{}
	for i, s := range specs {
		var mine []*Error
		if j, dup := first[s.Name]; dup && s.Name != "" {
			mine = append(mine, &Error{File: s.src.fileName(), Line: s.src.namePos().line, Projection: s.Name, Item: "name",
				Problem: "the name is taken by the projection " + declaredAt(specs[j], j, s),
				Fix:     "give each projection its own name"})
		} else {
			first[s.Name] = i
		}
		comp, err := Compile(ctx, s)
		if cerr := ctx.Err(); cerr != nil {
			return nil, cerr
		}
		var perr *Error
		switch {
		case err == nil:
			out = append(out, comp)
		case errors.As(err, &perr):
			for _, e := range unjoin(err) {
				if pe, ok := e.(*Error); ok {
					mine = append(mine, pe)
				}
			}
		default:
			return nil, err
		}
		errs = append(errs, sortByLine(mine)...)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// declaredAt says where the spec at index i was declared, as seen from the
// message about other.
func declaredAt(s Spec, i int, other Spec) string {
	switch {
	case s.src == nil:
		return fmt.Sprintf("specs[%d]", i)
	case other.src != nil && other.src.file == s.src.file:
		return fmt.Sprintf("on line %d", s.src.namePos().line)
	}
	return fmt.Sprintf("at %s:%d", s.src.file, s.src.namePos().line)
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// sortByLine puts the errors of a file in reading order; errors without a
// line keep the order of the checks.
func sortByLine(errs []*Error) []error {
	slices.SortStableFunc(errs, func(a, b *Error) int { return cmp.Compare(a.Line, b.Line) })
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = e
	}
	return out
}

// role is what a statement is for, which decides what it may do.
type role uint8

const (
	roleTable role = iota
	roleEvent
	roleForget
	roleQuery
)

// item is one statement of a Spec, with where it was declared.
type item struct {
	label string // "tables[0]", "on Deposited", "forget", "query by_account"
	at    pos
	sql   string
	role  role
}

// compiler holds the state of one Compile: the scratch connection and the
// problems found so far.
type compiler struct {
	spec   *Spec
	conn   *sql.Conn
	errs   []*Error
	failed map[string]bool // lower-cased names whose CREATE failed

	// schema is loaded on the first error that needs it, once every table
	// exists.
	schema       []relation
	schemaLoaded bool
}

// relation is a declared table or view and its columns.
type relation struct {
	name    string
	columns []string
}

// src returns the positions of the spec; a Spec built in Go has none, and
// every position of the empty source is line 0.
func (c *compiler) src() *source {
	if c.spec.src == nil {
		return &source{}
	}
	return c.spec.src
}

func (c *compiler) fail(at pos, text string, off int, label, problem, fix string) {
	c.errs = append(c.errs, &Error{File: c.src().file, Line: at.lineAt(text, off),
		Projection: c.spec.Name, Item: label, Problem: problem, Fix: fix})
}

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

// fileName, namePos, tablePos, forgetPos, onPos and queryPos fall back to the
// projection's own line for an item the source does not know, which is the
// case for a Spec changed after Parse.

func (s *source) fileName() string {
	if s == nil {
		return ""
	}
	return s.file
}

func (s *source) namePos() pos {
	if s == nil {
		return pos{}
	}
	return s.name
}

func (s *source) tablePos(i int) pos {
	if i < len(s.tables) {
		return s.tables[i]
	}
	return s.item
}

func (s *source) forgetPos() pos {
	if s.forget.line == 0 {
		return s.item
	}
	return s.forget
}

func (s *source) onPos(typ string) pos {
	if p, ok := s.on[typ]; ok {
		return p
	}
	return s.item
}

func (s *source) queryPos(name string) pos {
	if p, ok := s.queries[name]; ok {
		return p
	}
	return s.item
}
