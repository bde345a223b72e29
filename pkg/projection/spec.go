package projection

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Spec declares one projection. The zero value is not valid; [Compile] says
// what is missing. Nothing in this package modifies a Spec, so one may be
// shared once built.
type Spec struct {
	// Name names the projection; it matches ^[a-z][a-z0-9_]{0,62}$ and is
	// not "entities", the built-in projection.
	Name string
	// Tables are DDL statements (CREATE TABLE, CREATE [UNIQUE] INDEX,
	// CREATE VIEW) run in order on a fresh read-model file.
	Tables []string
	// On maps an event type to the one SQL statement run for it. The key "*"
	// serves every event type that has no statement of its own.
	On map[string]string
	// Forget is run when an entity is forgotten; it may use only :entity.
	// Empty runs nothing, so declare it for any read model that keeps an
	// entity's data.
	Forget string
	// Queries are the named read-only queries clients may run.
	Queries map[string]Query

	// src says where each item was declared, so that errors can point at
	// the line; nil for a Spec built in Go.
	src *source
}

// Query is one named read-only query of a projection.
type Query struct {
	// SQL is one SELECT (or WITH ... SELECT) statement; every :name in it is
	// a request parameter.
	SQL string
}

// Compiled is a validated Spec ready to execute. It is immutable, and so are
// its Statements: the engine may use them from any number of goroutines.
type Compiled struct {
	// Spec is the declaration this was compiled from.
	Spec Spec
	// On has the same keys as Spec.On.
	On map[string]*Statement
	// Forget is nil when Spec.Forget is empty.
	Forget *Statement
	// Queries has the same keys as Spec.Queries.
	Queries map[string]*Statement
}

// Statement is one checked SQL statement and the parameters it binds.
type Statement struct {
	// SQL is the statement as declared, minus a trailing semicolon and
	// trailing comments, so that the engine may wrap it in another statement.
	SQL string
	// Params are the names of the :name parameters, without the colon, in
	// order of first appearance and without repeats.
	Params []string
}

// Event is what a projection sees of one stored event.
type Event struct {
	Entity   string
	Version  int64
	Time     time.Time
	Position string
	Type     string
	// Data is the event's JSON data, normally an object.
	Data json.RawMessage
}

// Error is one problem in a declaration. Parse, Load, Compile and CompileAll
// report every problem they find as an *Error joined with errors.Join, so
// errors.As finds the first and unwrapping the join lists them all.
type Error struct {
	// File is the declaring file; empty for a Spec built in Go.
	File string
	// Line is the 1-based line in File; 0 when unknown.
	Line int
	// Projection is the name of the projection at fault; empty when the
	// problem is with the file itself or the name is unknown.
	Projection string
	// Item is the part at fault, such as "name", "tables[1]",
	// "on Deposited", "forget" or "query by_account"; empty for the whole
	// projection or file.
	Item string
	// Problem says what is wrong.
	Problem string
	// Fix says how to put it right.
	Fix string
}

// Error formats the problem as
// file:line: projection "name": item: problem (fix: how).
func (e *Error) Error() string {
	var b strings.Builder
	switch {
	case e.File != "" && e.Line > 0:
		fmt.Fprintf(&b, "%s:%d: ", e.File, e.Line)
	case e.File != "":
		b.WriteString(e.File + ": ")
	case e.Line > 0:
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Projection != "" {
		fmt.Fprintf(&b, "projection %q: ", e.Projection)
	}
	if e.Item != "" {
		b.WriteString(e.Item + ": ")
	}
	b.WriteString(e.Problem)
	if e.Fix != "" {
		b.WriteString(" (fix: " + e.Fix + ")")
	}
	return b.String()
}

// source records where the items of a Spec were declared.
type source struct {
	file    string
	item    pos // the projection's list item, for problems with no item of their own
	name    pos
	tables  []pos
	on      map[string]pos
	forget  pos
	queries map[string]pos
}

// pos is where a value was declared.
type pos struct {
	line int
	// literal marks a literal block scalar (|): its text starts on the next
	// line and keeps its line breaks, so a byte offset in the text maps to a
	// line of the file.
	literal bool
}

// lineAt is the file line of byte offset off of text declared at p.
func (p pos) lineAt(text string, off int) int {
	if !p.literal || p.line == 0 {
		return p.line
	}
	off = min(max(off, 0), len(text))
	return p.line + 1 + strings.Count(text[:off], "\n")
}

// maxNameLen bounds projection and query names, which name files and appear
// in subjects.
const maxNameLen = 63

// ValidName reports whether s matches ^[a-z][a-z0-9_]{0,62}$; a byte loop
// keeps the rule readable next to its error message.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > maxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || i > 0 && (c >= '0' && c <= '9' || c == '_')
		if !ok {
			return false
		}
	}
	return true
}

// suggestName turns an invalid name into the nearest valid one, for the fix
// of an error message.
func suggestName(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !strings.HasSuffix(b.String(), "_"):
			b.WriteByte('_')
		}
	}
	out := strings.TrimRight(b.String(), "_")
	if out == "" || out[0] < 'a' || out[0] > 'z' {
		out = "p" + out
	}
	if len(out) > maxNameLen {
		out = strings.TrimRight(out[:maxNameLen], "_")
	}
	return out
}

// closest returns the candidate nearest to word when it is near enough to be
// a likely typo, or "". Ties go to the earlier candidate so that messages are
// stable.
func closest(word string, candidates []string) string {
	w := strings.ToLower(word)
	limit := max(1, len(w)/3)
	best, bestD := "", limit+1
	for _, c := range candidates {
		if d := editDistance(w, strings.ToLower(c)); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance: Levenshtein plus
// swaps of adjacent bytes, the most common typo.
func editDistance(a, b string) int {
	// Three rows suffice: the swap looks two rows back.
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}
