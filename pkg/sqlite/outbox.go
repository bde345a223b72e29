package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"go.opentelemetry.io/otel/trace"
	"strconv"
)

// OutboxEvent is a committed event as the relay publishes it.
type OutboxEvent struct {
	Seq     int64
	Entity  string
	Version int64
	Payload []byte
	Time    int64 // unix nanoseconds
	// Idempotency is the digest of the append's idempotency key, on the last
	// event of a batch that had one, and FirstVersion that batch's first
	// version: a shard rebuilt from the stream recognises the retry too.
	Idempotency  string
	FirstVersion int64
	// Trace is the span of the request that appended the event, while the
	// event is in the in-memory tail (not stored): the relay's publish
	// continues that trace.
	Trace trace.SpanContext
}

// EventsAfter returns up to limit events with a position above seq, in
// commit order. Positions of forgotten entities' events are missing: the
// sequence is dense as committed, not after erasure.
func (s *Shard) EventsAfter(ctx context.Context, seq int64, limit int) ([]OutboxEvent, error) {
	out := make([]OutboxEvent, 0, limit)
	// The idempotency record of an append names its last event: the run's.
	var idem string
	var firstVersion int64
	err := s.eachEventAfter(ctx, "read outbox",
		`SELECT e.pos, e.entity, e.version, e.n, e.payload, e.time, COALESCE(i.key, ''), COALESCE(i.first_version, 0)
		   FROM events e LEFT JOIN idempotency i ON i.pos = e.pos
		  WHERE e.pos > ? ORDER BY e.pos LIMIT ?`, seq, limit,
		func(rows *sql.Rows, r *run) error {
			return rows.Scan(&r.pos, &r.entity, &r.version, &r.n, &r.payload, &r.time, &idem, &firstVersion)
		},
		func(r *run, pos, version int64, payload []byte) {
			e := OutboxEvent{Seq: pos, Entity: r.entity, Version: version, Payload: payload, Time: r.time}
			if pos == r.pos {
				e.Idempotency, e.FirstVersion = idem, firstVersion
			}
			out = append(out, e)
		})
	return out, err
}

// eachEventAfter passes emit each event with a position above seq, in
// position order, at most limit of them, from the runs query returns (its
// parameters seq and limit; every run holds at least one event, so limit
// runs hold enough). scan reads one row.
func (s *Shard) eachEventAfter(ctx context.Context, what, query string, seq int64, limit int,
	scan func(*sql.Rows, *run) error, emit func(r *run, pos, version int64, payload []byte)) error {
	rows, err := s.rdb.QueryContext(ctx, query, seq, limit)
	if err != nil {
		return s.noteErr(fmt.Errorf("sqlite: %s: %w", what, err))
	}
	defer rows.Close()
	n := 0
	for n < limit && rows.Next() {
		var r run
		if err := scan(rows, &r); err != nil {
			return s.noteErr(fmt.Errorf("sqlite: %s: %w", what, err))
		}
		err := r.events(func(pos, version int64, payload []byte) bool {
			if pos > seq {
				emit(&r, pos, version, payload)
				n++
			}
			return n < limit
		})
		if err != nil {
			return s.noteErr(err)
		}
	}
	return s.noteErr(rows.Err())
}

// maxTail bounds the in-memory tail (events); about 10 MiB of payloads.
const maxTail = 40_000

func (s *Shard) appendTail(group []*Commit) {
	s.tailMu.Lock()
	defer s.tailMu.Unlock()
	for _, c := range group {
		if !c.isWrite() {
			continue
		}
		for i, e := range c.Events {
			s.tail = append(s.tail, OutboxEvent{Seq: c.FirstSeq + int64(i), Entity: c.Entity, Version: e.Version, Payload: e.Payload, Time: e.Time.UnixNano(), Trace: c.span})
		}
		if r := c.Idempotency; r != nil {
			last := &s.tail[len(s.tail)-1]
			last.Idempotency, last.FirstVersion = IdempotencyDigest(r.Key), r.FirstVersion
		}
	}
	if over := len(s.tail) - maxTail; over > 0 {
		s.tail = append(s.tail[:0:0], s.tail[over:]...)
		s.tailFrom = s.tail[0].Seq
	}
}

// dropFromTail removes a forgotten entity's events from the tail.
func (s *Shard) dropFromTail(entity string) {
	s.tailMu.Lock()
	defer s.tailMu.Unlock()
	kept := s.tail[:0]
	for _, e := range s.tail {
		if e.Entity != entity {
			kept = append(kept, e)
		}
	}
	clear(s.tail[len(kept):])
	s.tail = kept
}

// Outbox returns up to limit events with a position above seq, in commit
// order: from memory when the tail reaches back to seq, else from the file.
// Events at or below seq are dropped from the tail.
func (s *Shard) Outbox(ctx context.Context, seq int64, limit int) ([]OutboxEvent, error) {
	s.tailMu.Lock()
	i := 0
	for i < len(s.tail) && s.tail[i].Seq <= seq {
		i++
	}
	// Clear what is dropped: a reslice alone leaves the published events,
	// payloads and all, alive in the front of the array until an append
	// happens to replace it (about 60 MB after the seed workload). An empty
	// tail lets its array go too.
	clear(s.tail[:i])
	s.tail = s.tail[i:]
	if len(s.tail) == 0 {
		s.tail = nil
	}
	// The tail answers only when it vouches for everything after seq.
	if s.tailFrom <= seq+1 {
		n := min(limit, len(s.tail))
		out := append([]OutboxEvent(nil), s.tail[:n]...)
		s.tailMu.Unlock()
		return out, nil
	}
	s.tailMu.Unlock()
	return s.EventsAfter(ctx, seq, limit)
}

// Committed is signalled (without blocking, coalesced) after every group
// commit, so the relay wakes up when there is something to publish.
func (s *Shard) Committed() <-chan struct{} { return s.committed }

func (s *Shard) signalCommitted() {
	select {
	case s.committed <- struct{}{}:
	default:
	}
}

// Published returns the position the relay last recorded as published.
func (s *Shard) Published(ctx context.Context) (int64, error) {
	p, err := readMetaInt(ctx, s.rdb, "published")
	if err != nil {
		return 0, s.noteErr(err)
	}
	return p, nil
}

// SetPublished records the position the stream holds up to. It rides in the
// writer's next group, so it costs no fsync of its own under load.
func (s *Shard) SetPublished(ctx context.Context, seq int64) error {
	return s.exec(ctx, func(ctx context.Context, conn *sql.Conn) error {
		_, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES ('published', ?)`, strconv.FormatInt(seq, 10))
		return err
	})
}
