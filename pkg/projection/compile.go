package projection

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
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
