package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"time"
)

// RestoreInfo is what PrepareRestored found in a restored shard file.
type RestoreInfo struct {
	LastSeq int64
	// Forgotten is how many of its entities were marked to be forgotten
	// again at the first open.
	Forgotten int
}

// PrepareRestored readies a shard file copied from a backup (closed, not
// in use) for a node of a new cluster, in one transaction:
//   - its identity must be the one expected (context, shard, shard count);
//   - what ties it to the old cluster goes: the lease epoch, whole_of and
//     the published position (the new stream is empty; the relay fills it
//     from the first position);
//   - every entity forgotten(entity) reports is marked as a forget in
//     progress (forget_pending), so the first open purges its rows, before
//     the shard serves or the relay publishes, as after a crash mid-forget.
//
// It runs SQLite's integrity check first and refuses a damaged file.
func PrepareRestored(ctx context.Context, path, kctx string, shard, shards int,
	forgotten func(entity string) (time.Time, bool)) (RestoreInfo, error) {
	if err := CheckIntegrity(ctx, path); err != nil {
		return RestoreInfo{}, err
	}
	db, err := sql.Open("sqlite", DSN(path, "busy_timeout(10000)"))
	if err != nil {
		return RestoreInfo{}, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	// A backup from an older Kuma is brought to this one's schema first.
	conn, err := db.Conn(ctx)
	if err != nil {
		return RestoreInfo{}, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	err = upgradeSchema(ctx, conn, path)
	conn.Close()
	if err != nil {
		return RestoreInfo{}, err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return RestoreInfo{}, err
	}
	defer tx.Rollback()
	want := map[string]string{
		"schema": strconv.Itoa(schemaVersion), "context": kctx,
		"shard": strconv.Itoa(shard), "shards": strconv.Itoa(shards),
	}
	for k, v := range want {
		var got string
		if err := tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, k).Scan(&got); err != nil {
			return RestoreInfo{}, fmt.Errorf("sqlite: %s has no %s in its meta (not a Kuma shard file?): %w", path, k, err)
		}
		if got != v {
			return RestoreInfo{}, fmt.Errorf("sqlite: %s holds %s=%s, not %s=%s", path, k, got, k, v)
		}
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM meta WHERE key IN ('epoch', 'whole_of', 'published')`); err != nil {
		return RestoreInfo{}, fmt.Errorf("sqlite: reset %s: %w", path, err)
	}
	var info RestoreInfo
	if err := tx.QueryRowContext(ctx, highWaterSQL).Scan(&info.LastSeq); err != nil {
		return RestoreInfo{}, fmt.Errorf("sqlite: read %s: %w", path, err)
	}
	rows, err := tx.QueryContext(ctx, `SELECT entity FROM entities`)
	if err != nil {
		return RestoreInfo{}, fmt.Errorf("sqlite: read %s: %w", path, err)
	}
	type mark struct {
		entity string
		at     time.Time
	}
	var marks []mark
	for rows.Next() {
		var e string
		if err := rows.Scan(&e); err != nil {
			rows.Close()
			return RestoreInfo{}, err
		}
		if at, ok := forgotten(e); ok {
			marks = append(marks, mark{e, at})
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return RestoreInfo{}, err
	}
	for _, m := range marks {
		if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO forget_pending (entity, reason, requested_by, requested_at) VALUES (?, ?, ?, ?)`,
			m.entity, "forgotten again after a restore (kuma restore)", "kuma restore", m.at.UnixNano()); err != nil {
			return RestoreInfo{}, fmt.Errorf("sqlite: mark a forget in %s: %w", path, err)
		}
	}
	info.Forgotten = len(marks)
	if err := tx.Commit(); err != nil {
		return RestoreInfo{}, fmt.Errorf("sqlite: reset %s: %w", path, err)
	}
	return info, nil
}
