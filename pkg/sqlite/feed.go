package sqlite

import (
	"context"
	"fmt"
)

// FeedRow is a committed event as the feed reads it: no idempotency
// record, which the outbox's EventsAfter joins in and the feed never shows.
type FeedRow struct {
	Seq     int64
	Entity  string
	Version int64
	Payload []byte
	Time    int64 // unix nanoseconds
}

// FeedAfter returns up to limit events with a position above seq, in commit
// order, from a reader connection (it never waits for the writer). The
// positions of forgotten entities' events are missing.
func (s *Shard) FeedAfter(ctx context.Context, seq int64, limit int) ([]FeedRow, error) {
	// Every row holds at least one event, so limit rows hold enough.
	rows, err := s.rdb.QueryContext(ctx,
		`SELECT pos, entity, version, n, payload, time FROM events WHERE pos > ? ORDER BY pos LIMIT ?`, seq, limit)
	if err != nil {
		return nil, s.noteErr(fmt.Errorf("sqlite: read the feed: %w", err))
	}
	defer rows.Close()
	out := make([]FeedRow, 0, limit)
	for len(out) < limit && rows.Next() {
		var r run
		if err := rows.Scan(&r.pos, &r.entity, &r.version, &r.n, &r.payload, &r.time); err != nil {
			return nil, s.noteErr(fmt.Errorf("sqlite: read the feed: %w", err))
		}
		err := r.events(func(pos, version int64, payload []byte) bool {
			if pos > seq {
				out = append(out, FeedRow{Seq: pos, Entity: r.entity, Version: version, Payload: payload, Time: r.time})
			}
			return len(out) < limit
		})
		if err != nil {
			return nil, s.noteErr(err)
		}
	}
	return out, s.noteErr(rows.Err())
}
