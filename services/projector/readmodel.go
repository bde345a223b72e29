package projector

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"go.opentelemetry.io/otel/trace"
)

// readModel is one generation of a projection: its own SQLite file with the
// model's tables and Kuma's bookkeeping (the last applied position per shard,
// the last applied stream sequence, the events an operator skipped). One
// writer applies; queries run on a separate read-only pool.
type readModel struct {
	path  string
	model model
	w     *sql.DB // one connection: the only writer
	r     *sql.DB // query_only connections

	stmts      map[string]*sql.Stmt // prepared on w; used by the applying goroutine only
	unprepared map[string]bool

	mu        sync.RWMutex // guards the fields below; closing takes it for writing
	closed    bool
	positions map[int]int64
	streamSeq uint64
	lastPos   kuma.Position
	skipped   int64
	spans     map[int]trace.SpanContext // per shard, the last apply's span
	// mapped holds pseudonyms known to be in _kuma_pseudonyms, so that an
	// entity's row is written once, not once per message (bounded: emptied
	// when full, which costs only rewrites that change nothing).
	mappedMu sync.Mutex
	mapped   map[string]struct{}
}

// maxMapped bounds readModel.mapped.
const maxMapped = 200_000

const bookkeeping = `
CREATE TABLE IF NOT EXISTS _kuma_positions (shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _kuma_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS _kuma_skipped (
	position   TEXT PRIMARY KEY,
	entity     TEXT NOT NULL,
	event_type TEXT NOT NULL,
	error      TEXT NOT NULL,
	skipped_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _kuma_pseudonyms (
	pseudonym TEXT PRIMARY KEY,
	entity    TEXT NOT NULL
) WITHOUT ROWID;`

// openReadModel opens (creating when new) a generation's file. fresh files
// get the model's schema and the spec they were built with, so an old
// generation can keep answering with its own spec while a new one builds.
func openReadModel(ctx context.Context, path string, m model, specJSON string) (*readModel, error) {
	_, statErr := os.Stat(path)
	fresh := errors.Is(statErr, os.ErrNotExist)
	if err := sqlite.PrepareFile(path); err != nil {
		return nil, err
	}
	// synchronous NORMAL: a power loss may cost the last transactions, but
	// the read model's positions fall back with them, and a consumer whose
	// acks are ahead of the read model is recreated at its position (see
	// resources), so nothing is missed; a process crash loses nothing.
	w, err := sql.Open("sqlite", sqlite.DSN(path,
		"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(NORMAL)",
		// Forgotten entities' rows are overwritten, not only unlinked.
		"secure_delete(ON)"))
	if err != nil {
		return nil, err
	}
	w.SetMaxOpenConns(1)
	rm := &readModel{path: path, model: m, w: w, positions: map[int]int64{}, spans: map[int]trace.SpanContext{}, mapped: map[string]struct{}{},
		stmts: map[string]*sql.Stmt{}, unprepared: map[string]bool{}}
	if err := rm.init(ctx, fresh, specJSON); err != nil {
		w.Close()
		return nil, fmt.Errorf("projector: open %s: %w", path, err)
	}
	rm.r, err = sql.Open("sqlite", sqlite.DSN(path, "busy_timeout(10000)", "query_only(1)"))
	if err != nil {
		w.Close()
		return nil, err
	}
	rm.r.SetMaxOpenConns(4)
	return rm, nil
}

func (rm *readModel) init(ctx context.Context, fresh bool, specJSON string) error {
	if fresh {
		tx, err := rm.w.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		for _, ddl := range append(rm.model.schema(), bookkeeping) {
			if _, err := tx.ExecContext(ctx, ddl); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO _kuma_meta (key, value) VALUES ('spec', ?), ('stream_seq', '0')`, specJSON); err != nil {
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	rows, err := rm.w.QueryContext(ctx, `SELECT shard, seq FROM _kuma_positions`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var shard int
		var seq int64
		if err := rows.Scan(&shard, &seq); err != nil {
			return err
		}
		rm.positions[shard] = seq
	}
	if err := rows.Err(); err != nil {
		return err
	}
	var seq string
	if err := rm.w.QueryRowContext(ctx, `SELECT value FROM _kuma_meta WHERE key = 'stream_seq'`).Scan(&seq); err != nil {
		return err
	}
	if rm.streamSeq, err = strconv.ParseUint(seq, 10, 64); err != nil {
		return err
	}
	var last string
	switch err := rm.w.QueryRowContext(ctx, `SELECT value FROM _kuma_meta WHERE key = 'last_position'`).Scan(&last); {
	case err == sql.ErrNoRows:
	case err != nil:
		return err
	default:
		if rm.lastPos, err = kuma.ParsePosition(last); err != nil {
			return err
		}
	}
	if err := rm.w.QueryRowContext(ctx, `SELECT count(*) FROM _kuma_skipped`).Scan(&rm.skipped); err != nil {
		return err
	}
	// A crash between a forget's commit and its checkpoint left the old
	// pages in the WAL: empty it before anything else.
	return rm.truncateWAL(ctx)
}

// storedSpec reads the spec a generation was built with.
func storedSpec(ctx context.Context, path string) (string, error) {
	db, err := sql.Open("sqlite", sqlite.DSN(path, "query_only(1)"))
	if err != nil {
		return "", err
	}
	defer db.Close()
	var s string
	err = db.QueryRowContext(ctx, `SELECT value FROM _kuma_meta WHERE key = 'spec'`).Scan(&s)
	return s, err
}

// txn is a transaction of the writer that runs each statement prepared once
// per file: parsing the same SQL for every event cost a tenth of the CPU.
type txn struct {
	ctx context.Context
	tx  *sql.Tx
	rm  *readModel
}

func (t txn) stmt(query string) (*sql.Stmt, error) {
	if st := t.rm.stmts[query]; st != nil {
		return t.tx.StmtContext(t.ctx, st), nil
	}
	// The writer's one connection is this transaction's: preparing on the
	// pool now would wait for it forever. Prepare in the transaction this
	// time, and for good once it ends (prepareNew).
	t.rm.unprepared[query] = true
	return t.tx.PrepareContext(t.ctx, query)
}

// prepareNew prepares, once the transaction is over, the statements it met
// for the first time.
func (rm *readModel) prepareNew(ctx context.Context) {
	for q := range rm.unprepared {
		if st, err := rm.w.PrepareContext(ctx, q); err == nil {
			rm.stmts[q] = st
		}
		delete(rm.unprepared, q)
	}
}

// exec runs a statement in the transaction.
func (t txn) exec(query string, args ...any) error {
	st, err := t.stmt(query)
	if err != nil {
		return err
	}
	_, err = st.ExecContext(t.ctx, args...)
	return err
}

// queryRow runs a one-row query in the transaction.
func (t txn) queryRow(query string, args ...any) (*sql.Row, error) {
	st, err := t.stmt(query)
	if err != nil {
		return nil, err
	}
	return st.QueryRowContext(t.ctx, args...), nil
}

func (rm *readModel) spanOf(shard int) trace.SpanContext {
	rm.mu.RLock()
	defer rm.mu.RUnlock()
	return rm.spans[shard]
}

// applied reports whether the read model has applied position p.
func (rm *readModel) applied(p kuma.Position) bool {
	rm.mu.RLock()
	defer rm.mu.RUnlock()
	return rm.positions[p.Shard] >= p.Seq
}

func (rm *readModel) seq() uint64 {
	rm.mu.RLock()
	defer rm.mu.RUnlock()
	return rm.streamSeq
}

// query runs a query unless the read model was closed (swapped out by a
// rebuild meanwhile): the caller then asks the live generation. Its rows
// fit in an answer of maxReply bytes.
func (rm *readModel) query(ctx context.Context, r *kuma.QueryRequest, maxReply int) (*kuma.QueryReply, bool, error) {
	rm.mu.RLock()
	defer rm.mu.RUnlock()
	if rm.closed {
		return nil, false, nil
	}
	out, err := rm.model.query(ctx, rm.r, r, newRowPage(maxReply))
	if out != nil && rm.lastPos.Seq > 0 {
		out.Position = rm.lastPos.String()
	}
	return out, true, err
}

// snapshot returns the bookkeeping for status.
func (rm *readModel) snapshot() (map[string]string, kuma.Position, uint64, int64) {
	rm.mu.RLock()
	defer rm.mu.RUnlock()
	pos := make(map[string]string, len(rm.positions))
	for s, seq := range rm.positions {
		pos[strconv.Itoa(s)] = kuma.Position{Shard: s, Seq: seq}.String()
	}
	return pos, rm.lastPos, rm.streamSeq, rm.skipped
}

// close waits for running queries and closes the file.
func (rm *readModel) close() error {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	if rm.closed {
		return nil
	}
	rm.closed = true
	for _, st := range rm.stmts {
		st.Close()
	}
	return errors.Join(rm.r.Close(), rm.w.Close())
}

// remove closes the file and deletes it with its WAL.
func (rm *readModel) remove() error {
	return errors.Join(rm.close(), removeFiles(rm.path))
}
