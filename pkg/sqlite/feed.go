package sqlite

import (
	"context"
	"database/sql"
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
	out := make([]FeedRow, 0, limit)
	err := s.eachEventAfter(ctx, "read the feed",
		`SELECT pos, entity, version, n, payload, time FROM events WHERE pos > ? ORDER BY pos LIMIT ?`, seq, limit,
		func(rows *sql.Rows, r *run) error {
			return rows.Scan(&r.pos, &r.entity, &r.version, &r.n, &r.payload, &r.time)
		},
		func(r *run, pos, version int64, payload []byte) {
			out = append(out, FeedRow{Seq: pos, Entity: r.entity, Version: version, Payload: payload, Time: r.time})
		})
	return out, err
}
