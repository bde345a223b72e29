package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// PendingForget is a forget that was started and not finished.
type PendingForget struct {
	Entity      string
	Reason      string
	RequestedBy string
	RequestedAt time.Time
}

// exec runs fn in the writer's transaction order: it is queued like a commit
// and runs inside a group transaction, so it is atomic and ordered with the
// commits around it.
func (s *Shard) exec(ctx context.Context, fn func(ctx context.Context, conn *sql.Conn) error) error {
	return s.Commit(ctx, &Commit{apply: fn})
}

// MarkForget durably records that a forget of entity has begun.
func (s *Shard) MarkForget(ctx context.Context, p PendingForget) error {
	return s.exec(ctx, func(ctx context.Context, conn *sql.Conn) error {
		_, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO forget_pending (entity, reason, requested_by, requested_at) VALUES (?, ?, ?, ?)`,
			p.Entity, p.Reason, p.RequestedBy, p.RequestedAt.UnixNano())
		return err
	})
}

// Purge deletes every row of entity (events, snapshots, idempotency keys,
// its entity row and its pending-forget mark) in one transaction and returns
// how many events it deleted. Purging an entity with no rows is a no-op.
func (s *Shard) Purge(ctx context.Context, entity string) (int64, error) {
	var n int64
	err := s.exec(ctx, func(ctx context.Context, conn *sql.Conn) error {
		if err := keepHighWater(ctx, conn); err != nil {
			return err
		}
		if err := conn.QueryRowContext(ctx, `SELECT COALESCE(SUM(n), 0) FROM events WHERE entity = ?`, entity).Scan(&n); err != nil {
			return err
		}
		return purgeRows(ctx, conn, entity)
	})
	if err != nil {
		return 0, fmt.Errorf("sqlite: purge: %w", err)
	}
	s.dropFromTail(entity)
	// Move the deleted pages out of the WAL into the (securely overwritten)
	// main file and truncate the WAL, so no old copy stays in it. Best effort:
	// a reader in the middle of a long query (past busy_timeout) holds it
	// back; the next purge, a clean close or the next open truncates it.
	if busy, err := s.truncateWAL(ctx); err != nil || busy {
		s.cfg.Logger.Warn("the WAL could not be truncated after a purge; it will be at the next purge or restart",
			"shard", s.cfg.Shard, "busy", busy, "err", err)
	}
	return n, nil
}

// truncateWAL checkpoints the whole WAL into the file and truncates it;
// busy reports that readers kept it from completing.
func (s *Shard) truncateWAL(ctx context.Context) (busy bool, err error) {
	err = s.Commit(ctx, &Commit{standalone: func(ctx context.Context, conn *sql.Conn) error {
		var b, log, done int64
		if err := conn.QueryRowContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&b, &log, &done); err != nil {
			return err
		}
		busy = b != 0
		return nil
	}})
	return busy, err
}

// The file's high-water position is kept in meta, apart from the rows: a
// forget deletes an entity's events, and when they were the file's last ones
// MAX(pos) falls back. Positions are never taken back (the stream carries
// them, and the corruption check compares the stream's end with the file's),
// so every delete that can lower MAX(pos) first records it here, in the same
// transaction; Open, Inspect and the writer take the larger of the two.
// Only TruncateAfter lowers it, deliberately.
const highWaterKey = "high_water"

// highWaterSQL is the file's last position: the larger of its highest row
// and its recorded high-water.
const highWaterSQL = `SELECT max(COALESCE((SELECT MAX(pos) FROM events), 0),
	COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = '` + highWaterKey + `'), 0))`

// raiseHighWater records seq as the file's last position if it is beyond
// the recorded one and every row.
func raiseHighWater(ctx context.Context, conn *sql.Conn, seq int64) error {
	if _, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) SELECT '`+highWaterKey+`', CAST(max(?, (`+highWaterSQL+`)) AS TEXT)`, seq); err != nil {
		return fmt.Errorf("sqlite: record high-water position: %w", err)
	}
	return nil
}

// keepHighWater records the file's last position before rows are deleted.
func keepHighWater(ctx context.Context, conn *sql.Conn) error {
	if _, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) SELECT '`+highWaterKey+`', CAST((`+highWaterSQL+`) AS TEXT)`); err != nil {
		return fmt.Errorf("sqlite: record high-water position: %w", err)
	}
	return nil
}

// wdbExec runs q on the writer's connection outside any transaction (a
// checkpoint cannot run inside one), queued between groups.
func (s *Shard) wdbExec(ctx context.Context, q string) (sql.Result, error) {
	var res sql.Result
	err := s.Commit(ctx, &Commit{standalone: func(ctx context.Context, conn *sql.Conn) error {
		var e error
		res, e = conn.ExecContext(ctx, q)
		return e
	}})
	return res, err
}

// PendingForgets lists forgets that a crash interrupted.
func (s *Shard) PendingForgets(ctx context.Context) ([]PendingForget, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT entity, reason, requested_by, requested_at FROM forget_pending`)
	if err != nil {
		return nil, s.noteErr(fmt.Errorf("sqlite: read pending forgets: %w", err))
	}
	defer rows.Close()
	var out []PendingForget
	for rows.Next() {
		var p PendingForget
		var at int64
		if err := rows.Scan(&p.Entity, &p.Reason, &p.RequestedBy, &at); err != nil {
			return nil, err
		}
		p.RequestedAt = fromNanos(at)
		out = append(out, p)
	}
	return out, s.noteErr(rows.Err())
}
