package projector

import (
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/projection"
)

// model is what a read model does with events and queries. The built-in
// entities projection and the declared ones implement it. apply and forget run
// inside the transaction that also moves the projection's positions, so an
// event's effect and the note that it was applied commit together.
type model interface {
	// schema is the DDL of a fresh read-model file.
	schema() []string
	// apply applies events in order; on failure it returns the index of the
	// event that failed.
	apply(t txn, evs []projection.Event) (int, error)
	// forget drops what the model holds of an entity.
	forget(t txn, entity string) error
	// query answers a query on a read-only connection, with no more rows
	// than page lets fit in one answer.
	query(ctx context.Context, db *sql.DB, r *kuma.QueryRequest, page *rowPage) (*kuma.QueryReply, error)
}

// replyAround is what a query answer holds besides its rows: the longest
// next_cursor (an entity id of 128 characters in base64) and a position,
// with their keys, and room to spare.
const replyAround = 512

// rowPage keeps a query's rows within one answer: a page is cut by size as
// well as by count, and next_cursor gives the rest. The first row is always
// taken if it fits at all; one that cannot answers payload_too_large.
type rowPage struct {
	limit int // the largest answer body
	page  *natsbus.Page
}

func newRowPage(maxReply int) *rowPage {
	return &rowPage{limit: maxReply, page: natsbus.NewPage(maxReply, replyAround)}
}

// add reports whether row fits in what is left, and takes its room if so.
// A row that does not fit on an empty page is the error the caller
// returns, described by what.
func (p *rowPage) add(row map[string]any, what func() string) (bool, error) {
	fits, size, err := p.page.Add(row)
	if err != nil || fits {
		return fits, err
	}
	if p.page.Len() == 0 {
		return false, natsbus.TooLarge(size+replyAround, p.limit, what(),
			"no page can hold it; narrow the query, or raise the NATS server's max_payload")
	}
	return false, nil
}

// declared runs a projection declared in a file or in Go.
type declared struct {
	c *projection.Compiled
}

func (d *declared) schema() []string { return d.c.Spec.Tables }

func (d *declared) apply(t txn, evs []projection.Event) (int, error) {
	for i, ev := range evs {
		st := d.c.On[ev.Type]
		if st == nil {
			st = d.c.On["*"]
		}
		if st == nil {
			continue // the projection has nothing to do with this type
		}
		args, err := st.BindEvent(ev)
		if err != nil {
			return i, err
		}
		if err := t.exec(st.SQL, args...); err != nil {
			return i, err
		}
	}
	return 0, nil
}

func (d *declared) forget(t txn, entity string) error {
	if d.c.Forget == nil {
		return nil
	}
	args, err := d.c.Forget.BindEvent(projection.Event{Entity: entity})
	if err != nil {
		return err
	}
	return t.exec(d.c.Forget.SQL, args...)
}

func (d *declared) query(ctx context.Context, db *sql.DB, r *kuma.QueryRequest, page *rowPage) (*kuma.QueryReply, error) {
	st := d.c.Queries[r.Query]
	if st == nil {
		return nil, kuma.Errorf(kuma.CodeNotFound, "projection %q has no query %q", d.c.Spec.Name, r.Query)
	}
	args, err := st.BindQuery(r.Params)
	if err != nil {
		return nil, err
	}
	offset, err := decodeOffset(r.Cursor)
	if err != nil {
		return nil, err
	}
	// One more row than asked tells whether there is a next page.
	q := "SELECT * FROM (" + strings.TrimRight(strings.TrimSpace(st.SQL), ";") + ") LIMIT " +
		strconv.Itoa(r.Limit+1) + " OFFSET " + strconv.FormatInt(offset, 10)
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, queryError(ctx, err)
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return nil, err
	}
	out := &kuma.QueryReply{Rows: []map[string]any{}}
	vals := make([]any, len(cols))
	ptrs := make([]any, len(cols))
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	for rows.Next() {
		if len(out.Rows) == r.Limit {
			out.NextCursor = encodeOffset(offset + int64(r.Limit))
			break
		}
		if err := rows.Scan(ptrs...); err != nil {
			return nil, queryError(ctx, err)
		}
		row := make(map[string]any, len(cols))
		for i, c := range cols {
			if b, ok := vals[i].([]byte); ok {
				row[c] = string(b) // a BLOB comes out as text, not base64
				continue
			}
			row[c] = vals[i]
		}
		fits, err := page.add(row, func() string {
			return fmt.Sprintf("row %d of query %q", offset+1, r.Query)
		})
		if err != nil {
			return nil, err
		}
		if !fits {
			out.NextCursor = encodeOffset(offset + int64(len(out.Rows)))
			break
		}
		out.Rows = append(out.Rows, row)
	}
	if err := rows.Err(); err != nil {
		return nil, queryError(ctx, err)
	}
	return out, nil
}

// queryError turns the time limit into timeout; other failures of a
// validated query are internal (the message is logged, not sent).
func queryError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return kuma.Errorf(kuma.CodeTimeout, "the query did not finish within its time limit")
	}
	return fmt.Errorf("%w: %v", kuma.ErrInternal, err)
}

func encodeOffset(n int64) string {
	return base64.RawURLEncoding.EncodeToString([]byte("o" + strconv.FormatInt(n, 10)))
}

func decodeOffset(c string) (int64, error) {
	if c == "" {
		return 0, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err == nil && len(b) > 1 && b[0] == 'o' {
		if n, err := strconv.ParseInt(string(b[1:]), 10, 64); err == nil && n >= 0 {
			return n, nil
		}
	}
	return 0, kuma.Errorf(kuma.CodeBadRequest, "cursor is not one this projection gave")
}

// entities is the built-in projection: the latest state of every entity,
// folded with the context's reducer.
type entities struct {
	reducer kuma.Reducer
}

// EntitiesProjection is the name of the built-in projection.
const EntitiesProjection = "entities"

func (m *entities) schema() []string {
	return []string{`CREATE TABLE entities (
		entity     TEXT PRIMARY KEY,
		version    INTEGER NOT NULL,
		state      TEXT NOT NULL,
		updated_at INTEGER NOT NULL
	) WITHOUT ROWID`}
}

func (m *entities) apply(t txn, evs []projection.Event) (int, error) {
	// Fold each entity's run of events in one call and write it once: a
	// message often holds many events of one entity (an append of 100 is
	// one run), and the reducer folds a run faster than event by event.
	type run struct {
		idx    []int
		events []kuma.Event
	}
	runs := map[string]*run{}
	var order []string
	for i, ev := range evs {
		r := runs[ev.Entity]
		if r == nil {
			r = &run{}
			runs[ev.Entity] = r
			order = append(order, ev.Entity)
		}
		r.idx = append(r.idx, i)
		r.events = append(r.events, kuma.Event{Entity: ev.Entity, Version: ev.Version, Type: ev.Type, Data: ev.Data, Time: ev.Time})
	}
	for _, e := range order {
		r := runs[e]
		var state []byte
		row, err := t.queryRow(`SELECT state FROM entities WHERE entity = ?`, e)
		if err == nil {
			err = row.Scan(&state)
		}
		if err != nil && err != sql.ErrNoRows {
			return r.idx[0], err
		}
		next, err := m.reducer.Fold(state, r.events)
		if err != nil {
			return r.idx[m.failing(state, r.events)], err
		}
		last := r.events[len(r.events)-1]
		err = t.exec(`INSERT INTO entities (entity, version, state, updated_at) VALUES (?, ?, ?, ?)
			ON CONFLICT (entity) DO UPDATE SET version = excluded.version, state = excluded.state, updated_at = excluded.updated_at`,
			e, last.Version, string(next), last.Time.UnixMicro())
		if err != nil {
			return r.idx[0], err
		}
	}
	return 0, nil
}

// failing finds which event of a run the reducer refuses, folding one at a
// time (only after the run as a whole failed).
func (m *entities) failing(state json.RawMessage, evs []kuma.Event) int {
	for i := range evs {
		next, err := m.reducer.Fold(state, evs[i:i+1])
		if err != nil {
			return i
		}
		state = next
	}
	return 0
}

func (m *entities) forget(t txn, entity string) error {
	return t.exec(`DELETE FROM entities WHERE entity = ?`, entity)
}

// query answers {"params": {"where": {...}, "prefix": "..."}}: equality on
// top-level state fields (scalars only), an entity id prefix, pages in
// entity id order with the last id as cursor.
func (m *entities) query(ctx context.Context, db *sql.DB, r *kuma.QueryRequest, page *rowPage) (*kuma.QueryReply, error) {
	if r.Query != "" {
		return nil, kuma.Errorf(kuma.CodeNotFound, "the entities projection has no named queries; send params.where and params.prefix")
	}
	var where map[string]json.RawMessage
	var prefix string
	for k, v := range r.Params {
		switch k {
		case "where":
			if err := json.Unmarshal(v, &where); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "params.where must be an object of field: value")
			}
		case "prefix":
			if err := json.Unmarshal(v, &prefix); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "params.prefix must be a string")
			}
		default:
			return nil, kuma.Errorf(kuma.CodeBadRequest, "unknown parameter %q: the entities projection takes where and prefix", k)
		}
	}
	var sb strings.Builder
	sb.WriteString(`SELECT entity, version, state, updated_at FROM entities WHERE 1`)
	var args []any
	if prefix != "" {
		// A range scan on the primary key; ids are ASCII, so the prefix
		// followed by the highest byte bounds it.
		sb.WriteString(` AND entity >= ? AND entity < ?`)
		args = append(args, prefix, prefix+"\x7f")
	}
	if r.Cursor != "" {
		after, err := base64.RawURLEncoding.DecodeString(r.Cursor)
		if err != nil || kuma.ValidateEntityID(string(after)) != nil {
			return nil, kuma.Errorf(kuma.CodeBadRequest, "cursor is not one this projection gave")
		}
		sb.WriteString(` AND entity > ?`)
		args = append(args, string(after))
	}
	keys := make([]string, 0, len(where))
	for k := range where {
		keys = append(keys, k)
	}
	sort.Strings(keys) // the same request, the same SQL
	for _, k := range keys {
		cond, val, err := whereClause(k, where[k])
		if err != nil {
			return nil, err
		}
		sb.WriteString(cond)
		args = append(args, val...)
	}
	sb.WriteString(` ORDER BY entity LIMIT ?`)
	args = append(args, r.Limit+1)
	rows, err := db.QueryContext(ctx, sb.String(), args...)
	if err != nil {
		return nil, queryError(ctx, err)
	}
	defer rows.Close()
	out := &kuma.QueryReply{Rows: []map[string]any{}}
	var last string
	for rows.Next() {
		if len(out.Rows) == r.Limit {
			out.NextCursor = base64.RawURLEncoding.EncodeToString([]byte(last))
			break
		}
		var e string
		var v, at int64
		var state []byte
		if err := rows.Scan(&e, &v, &state, &at); err != nil {
			return nil, queryError(ctx, err)
		}
		row := map[string]any{
			"entity": e, "version": v, "state": json.RawMessage(state),
			"updated_at": time.UnixMicro(at).UTC(),
		}
		fits, err := page.add(row, func() string {
			return fmt.Sprintf("the row of entity %q (its state at version %d)", e, v)
		})
		if err != nil {
			return nil, err
		}
		if !fits {
			out.NextCursor = base64.RawURLEncoding.EncodeToString([]byte(last))
			break
		}
		last = e
		out.Rows = append(out.Rows, row)
	}
	if err := rows.Err(); err != nil {
		return nil, queryError(ctx, err)
	}
	return out, nil
}

// whereClause matches one top-level state field against a JSON scalar,
// by JSON type as well as value, so "1" does not match 1 nor true match 1.
func whereClause(field string, v json.RawMessage) (string, []any, error) {
	path := `$."` + strings.ReplaceAll(field, `"`, `\"`) + `"`
	var x any
	dec := json.NewDecoder(strings.NewReader(string(v)))
	dec.UseNumber()
	if err := dec.Decode(&x); err != nil {
		return "", nil, kuma.Errorf(kuma.CodeBadRequest, "params.where.%s is not JSON", field)
	}
	switch t := x.(type) {
	case nil:
		return ` AND json_type(state, ?) = 'null'`, []any{path}, nil
	case bool:
		if t {
			return ` AND json_type(state, ?) = 'true'`, []any{path}, nil
		}
		return ` AND json_type(state, ?) = 'false'`, []any{path}, nil
	case string:
		return ` AND json_type(state, ?) = 'text' AND json_extract(state, ?) = ?`, []any{path, path, t}, nil
	case json.Number:
		if n, err := t.Int64(); err == nil {
			return ` AND json_type(state, ?) IN ('integer', 'real') AND json_extract(state, ?) = ?`, []any{path, path, n}, nil
		}
		f, err := t.Float64()
		if err != nil {
			return "", nil, kuma.Errorf(kuma.CodeBadRequest, "params.where.%s is out of range", field)
		}
		return ` AND json_type(state, ?) IN ('integer', 'real') AND json_extract(state, ?) = ?`, []any{path, path, f}, nil
	}
	return "", nil, kuma.Errorf(kuma.CodeBadRequest, "params.where.%s must be a string, number, boolean or null", field)
}
