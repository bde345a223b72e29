package projector

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"go.opentelemetry.io/otel/trace"
)

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
