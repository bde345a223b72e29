package projector

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
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

// batch is what one stream message asks of a read model.
type batch struct {
	streamSeq uint64
	shard     int
	lastSeq   int64 // the message's last position in its shard (0 for a notice)
	events    []projection.Event
	forget    string       // entity of a forget notice written before pseudonyms
	rejected  *rejectError // a message the relay did not publish: applies nothing
	// forgetPseudonym names the entity of a forget notice (both forget
	// fields are set only once the keyvault confirmed the forget).
	forgetPseudonym string
	// pseudonyms maps the pseudonyms of the batch's entities to their ids:
	// the read model keeps them, since a forget notice names the entity
	// only by pseudonym and the keyvault no longer knows the id by then.
	pseudonyms map[string]string
	skip       map[string]skipNote
	span       trace.SpanContext // of the apply, for queries that wait for its position
}

type skipNote struct{ entity, eventType, err string }

// applyError is an event the model failed on: the projection stops there.
type applyError struct {
	index int
	event projection.Event
	err   error
}

func (e *applyError) Error() string {
	return fmt.Sprintf("event %s (%s of %s) failed: %v", e.event.Position, e.event.Type, e.event.Entity, e.err)
}

func (e *applyError) Unwrap() error { return e.err }

// apply commits a batch's effect with the positions it moves to, in one
// transaction: a redelivered message finds its positions already there and
// changes nothing.
func (rm *readModel) apply(ctx context.Context, b *batch, now time.Time) error {
	rm.mu.RLock()
	done := b.lastSeq > 0 && rm.positions[b.shard] >= b.lastSeq
	// A refused message has no position: its stream sequence tells a
	// redelivery of one already skipped.
	done = done || b.rejected != nil && b.streamSeq <= rm.streamSeq
	from := rm.positions[b.shard]
	rm.mu.RUnlock()
	if done {
		return nil // a redelivery: already applied
	}
	var rejectNote skipNote
	if b.rejected != nil {
		pos := rejectedPosition(b.streamSeq)
		note, ok := b.skip[pos]
		if !ok {
			return &applyError{event: projection.Event{Position: pos}, err: b.rejected}
		}
		rejectNote = note
	}
	tx, err := rm.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer rm.prepareNew(ctx)
	defer tx.Rollback()
	t := txn{ctx: ctx, tx: tx, rm: rm}
	skipped := 0
	skip := func(position, entity string, note skipNote) error {
		skipped++
		return t.exec(`INSERT OR REPLACE INTO _kuma_skipped (position, entity, event_type, error, skipped_at) VALUES (?, ?, ?, ?, ?)`,
			position, entity, note.eventType, note.err, now.UTC().Format(time.RFC3339Nano))
	}
	if b.rejected != nil {
		// Skipped by an operator: recorded, and only the stream sequence
		// moves past it.
		if err := skip(rejectedPosition(b.streamSeq), "", rejectNote); err != nil {
			return err
		}
	}
	forget := b.forget
	if b.forgetPseudonym != "" {
		row, err := t.queryRow(`SELECT entity FROM _kuma_pseudonyms WHERE pseudonym = ?`, b.forgetPseudonym)
		if err != nil {
			return err
		}
		if err := row.Scan(&forget); err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		// No row: the model never held the entity, so it has nothing to drop.
	}
	if forget != "" {
		if note, ok := b.skip[forgetPosition]; ok {
			// The id is not kept: the entity is forgotten.
			if err := skip(forgetPosition+strconv.FormatUint(b.streamSeq, 10), "", note); err != nil {
				return err
			}
		} else {
			if err := rm.model.forget(t, forget); err != nil {
				return rm.failed(ctx, &applyError{event: projection.Event{Position: forgetPosition, Type: "(forgotten)"}, err: err})
			}
			// What an operator skipped of the entity goes too.
			if err := t.exec(`DELETE FROM _kuma_skipped WHERE entity = ?`, forget); err != nil {
				return err
			}
		}
		// By pseudonym (its key) when the notice has it; a notice written
		// before pseudonyms names the id (rare: a scan is fine).
		del, arg := `DELETE FROM _kuma_pseudonyms WHERE pseudonym = ?`, b.forgetPseudonym
		if arg == "" {
			del, arg = `DELETE FROM _kuma_pseudonyms WHERE entity = ?`, forget
		}
		if err := t.exec(del, arg); err != nil {
			return err
		}
	}
	var mapped []string
	for p, entity := range b.pseudonyms {
		rm.mappedMu.Lock()
		_, ok := rm.mapped[p]
		rm.mappedMu.Unlock()
		if ok {
			continue
		}
		if err := t.exec(`INSERT OR IGNORE INTO _kuma_pseudonyms (pseudonym, entity) VALUES (?, ?)`, p, entity); err != nil {
			return err
		}
		mapped = append(mapped, p)
	}
	evs := b.events[:0:0]
	for _, ev := range b.events {
		p, _ := kuma.ParsePosition(ev.Position)
		if p.Seq <= from {
			continue
		}
		if note, ok := b.skip[ev.Position]; ok {
			if err := skip(ev.Position, ev.Entity, note); err != nil {
				return err
			}
			continue
		}
		evs = append(evs, ev)
	}
	if len(evs) > 0 {
		if i, err := rm.model.apply(t, evs); err != nil {
			return rm.failed(ctx, &applyError{index: i, event: evs[i], err: err})
		}
	}
	if b.lastSeq > 0 {
		if err := t.exec(`INSERT INTO _kuma_positions (shard, seq) VALUES (?, ?)
			ON CONFLICT (shard) DO UPDATE SET seq = excluded.seq`, b.shard, b.lastSeq); err != nil {
			return err
		}
		if err := t.exec(`INSERT OR REPLACE INTO _kuma_meta (key, value) VALUES ('last_position', ?)`,
			kuma.Position{Shard: b.shard, Seq: b.lastSeq}.String()); err != nil {
			return err
		}
	}
	// max: a redelivered notice (no position) must not move it back.
	if err := t.exec(`UPDATE _kuma_meta SET value = max(CAST(value AS INTEGER), ?) WHERE key = 'stream_seq'`, int64(b.streamSeq)); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	rm.mappedMu.Lock()
	if len(rm.mapped)+len(mapped) > maxMapped {
		clear(rm.mapped)
	}
	for _, p := range mapped {
		rm.mapped[p] = struct{}{}
	}
	if b.forgetPseudonym != "" {
		delete(rm.mapped, b.forgetPseudonym)
	}
	rm.mappedMu.Unlock()
	if forget != "" {
		if err := rm.truncateWAL(ctx); err != nil {
			return err
		}
	}
	rm.mu.Lock()
	if b.lastSeq > 0 {
		rm.positions[b.shard] = b.lastSeq
		rm.lastPos = kuma.Position{Shard: b.shard, Seq: b.lastSeq}
		// Under the same lock as the position: a query that sees the
		// position applied finds this apply's span.
		if b.span.IsValid() {
			rm.spans[b.shard] = b.span
		}
	}
	if b.streamSeq > rm.streamSeq {
		rm.streamSeq = b.streamSeq
	}
	rm.skipped += int64(skipped)
	rm.mu.Unlock()
	return nil
}

// forgetPosition stands for a forget notice (which has no position) where a
// position is expected: in status and in a skip request.
const forgetPosition = "forget"

// failed tells a failed statement from a transient failure: with the
// context done (stopping, or the ack wait ran out) it is not the event's
// fault, so the projection does not stop on it.
func (rm *readModel) failed(ctx context.Context, ae *applyError) error {
	if ctx.Err() != nil {
		return fmt.Errorf("projector: apply interrupted: %w", ctx.Err())
	}
	return ae
}

// truncateWAL checkpoints the WAL into the file and empties it: after a
// forget, the WAL still holds the pages as they were before the delete. A
// reader can hold the checkpoint back for a moment, so it is retried; if it
// cannot finish, the forget is retried as a whole (it is idempotent).
func (rm *readModel) truncateWAL(ctx context.Context) error {
	for i := 0; ; i++ {
		var busy, logFrames, done int
		if err := rm.w.QueryRowContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &logFrames, &done); err != nil {
			return err
		}
		if busy == 0 {
			return nil
		}
		if i == 50 {
			return fmt.Errorf("projector: the WAL of %s could not be truncated after a forget (readers hold it)", rm.path)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
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
