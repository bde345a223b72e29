package sqlite

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
)

// ErrFenced is returned by a commit when the shard file belongs to a newer
// lease epoch than the writer's: another node has owned the shard since, so
// this writer must not write, whatever it believes about its lease.
var ErrFenced = errors.New("sqlite: the shard file was taken over under a newer lease epoch")

// IdempotencyDigest is how an idempotency key is kept: the shard file and the
// event stream hold only its SHA-256, so a key that carries an order number
// or a name is not kept in clear, and a node rebuilding a shard from the
// stream can still recognise a client's retry.
func IdempotencyDigest(key string) string {
	sum := sha256.Sum256([]byte(key))
	return "sha256:" + base64.RawURLEncoding.EncodeToString(sum[:])
}

// Epoch returns the lease epoch recorded in the file (0 if none).
func (s *Shard) Epoch(ctx context.Context) (int64, error) {
	return readEpoch(ctx, s.rdb)
}

type queryRower interface {
	QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row
}

func readEpoch(ctx context.Context, db queryRower) (int64, error) {
	return readMetaInt(ctx, db, "epoch")
}

// readMetaInt reads a whole number kept in meta under key (0 when absent).
func readMetaInt(ctx context.Context, db queryRower, key string) (int64, error) {
	return scanMetaInt(db.QueryRowContext(ctx, metaIntSQL, key), key)
}

const metaIntSQL = `SELECT value FROM meta WHERE key = ?`

// scanMetaInt reads the value of readMetaInt's query (0 when absent).
func scanMetaInt(row *sql.Row, key string) (int64, error) {
	var v string
	err := row.Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("sqlite: read %s: %w", key, err)
	}
	return strconv.ParseInt(v, 10, 64)
}

// claimEpoch records cfg.Epoch in the file when it is newer, and refuses to
// open a file that a newer epoch has written.
func (s *Shard) claimEpoch(ctx context.Context) error {
	if s.cfg.Epoch == 0 {
		return nil
	}
	got, err := s.checkEpoch(ctx)
	if err != nil {
		return fmt.Errorf("%w: %s", err, s.cfg.Path)
	}
	if got < s.cfg.Epoch {
		if _, err := s.wconn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)`,
			strconv.FormatInt(s.cfg.Epoch, 10)); err != nil {
			return fmt.Errorf("sqlite: record epoch in %s: %w", s.cfg.Path, err)
		}
	}
	return nil
}

// checkEpoch reads the file's epoch on the writer's connection and fails
// with ErrFenced when it is newer than this writer's.
func (s *Shard) checkEpoch(ctx context.Context) (int64, error) {
	var got int64
	var err error
	if s.stmts != nil {
		// Every commit checks: the prepared query, not SQL parsed each time
		// (1.6 % of a node's CPU). Before the statements exist (the claim
		// at open), the query itself.
		got, err = scanMetaInt(s.stmts.epoch.QueryRowContext(ctx, "epoch"), "epoch")
	} else {
		got, err = readEpoch(ctx, s.wconn)
	}
	if err != nil {
		return 0, err
	}
	if got > s.cfg.Epoch {
		return got, fmt.Errorf("%w (file epoch %d, this writer's %d)", ErrFenced, got, s.cfg.Epoch)
	}
	return got, nil
}

// fenced runs inside every write transaction, just before COMMIT: the
// caller's own lease check (Config.Fence), then the epoch in the file. A
// paused owner that wakes up after its lease ran out is refused by the first;
// a second process writing the same file under an older epoch by the second.
func (s *Shard) fenced(ctx context.Context) error {
	if s.cfg.Fence != nil {
		if err := s.cfg.Fence(); err != nil {
			return err
		}
	}
	if s.cfg.Epoch == 0 {
		return nil
	}
	_, err := s.checkEpoch(ctx)
	return err
}

// MarkWhole records in the file that it holds the shard's whole history as
// of this writer's epoch: its owner caught it up (or found nothing to catch
// up) and claimed the shard in the stream. From then on every event written
// under the epoch is written here. A later take that finds the mark at or
// past the last epoch that served can trust the file whole, even if takes in
// between failed (a lease that never served wrote nothing). It rides in the
// writer's next group.
func (s *Shard) MarkWhole(ctx context.Context) error {
	if s.cfg.Epoch == 0 {
		return nil
	}
	return s.exec(ctx, func(ctx context.Context, conn *sql.Conn) error {
		_, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES ('whole_of', ?)`, strconv.FormatInt(s.cfg.Epoch, 10))
		return err
	})
}

// UnmarkWhole removes the whole-history mark from a closed copy of a shard
// file. The mark says its writer's own file holds everything written under
// the epoch; a copy holds only what was written before it was made, and put
// in place by a take that then failed, a copy trusted whole would make the
// retake skip the stream's later events.
func UnmarkWhole(ctx context.Context, path string) error {
	db, err := sql.Open("sqlite", DSN(path, "busy_timeout(10000)"))
	if err != nil {
		return fmt.Errorf("sqlite: unmark %s: %w", path, err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `DELETE FROM meta WHERE key = 'whole_of'`); err != nil {
		return fmt.Errorf("sqlite: unmark %s: %w", path, err)
	}
	return db.Close()
}

// BackupInfo describes a consistent copy of a shard file.
type BackupInfo struct {
	LastSeq   int64 // position of the last event in the copy
	Published int64 // position the stream held when the copy was made
	Epoch     int64
	// WholeOf is the newest epoch whose whole history the copy holds
	// (MarkWhole; 0 for a file older than the mark).
	WholeOf int64
	Bytes   int64
}

// Backup writes a consistent copy of the shard to dst (which must not exist)
// while the writer goes on (CopyInto). The copy is not marked whole: the
// writer goes on writing under its epoch after the copy is made.
func (s *Shard) Backup(ctx context.Context, dst string) (BackupInfo, error) {
	if err := CopyInto(ctx, s.cfg.Path, dst); err != nil {
		return BackupInfo{}, err
	}
	if err := UnmarkWhole(ctx, dst); err != nil {
		_ = os.Remove(dst)
		return BackupInfo{}, err
	}
	info, err := Inspect(ctx, dst)
	if err != nil {
		_ = os.Remove(dst)
		return BackupInfo{}, err
	}
	return info, nil
}

// CopyInto writes a consistent copy of the SQLite file src to dst (which
// must not exist; it is created private) while src's writers go on: VACUUM
// INTO reads one snapshot of the WAL database from its own connection, so
// commits are not held up. The copy is compact and made with
// secure_delete, which reaches the pages VACUUM INTO builds: without it a
// page the copy split keeps old bytes of rows in its free space (a root
// turned interior keeps its leaf cells), which a later delete of those
// rows, zeroing only their cells, leaves behind
// (TestBackupUnderLoadRestoreAndForgetAgain found a forgotten id so).
func CopyInto(ctx context.Context, src, dst string) error {
	db, err := sql.Open("sqlite", DSN(src, "busy_timeout(10000)", "secure_delete(ON)"))
	if err != nil {
		return fmt.Errorf("sqlite: copy of %s: %w", src, err)
	}
	defer db.Close()
	// VACUUM INTO would create dst 0644: it takes an empty file made here.
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, PrivateFileMode)
	if err != nil {
		return fmt.Errorf("sqlite: copy of %s: %w", src, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("sqlite: copy of %s: %w", src, err)
	}
	if _, err := db.ExecContext(ctx, `VACUUM INTO ?`, dst); err != nil {
		_ = os.Remove(dst)
		return fmt.Errorf("sqlite: copy of %s: %w", src, err)
	}
	return nil
}

// Inspect reads what a (closed) shard file holds: its last position, its
// published position and its epoch. A missing file is an error.
func Inspect(ctx context.Context, path string) (BackupInfo, error) {
	st, err := os.Stat(path)
	if err != nil {
		return BackupInfo{}, fmt.Errorf("sqlite: inspect %s: %w", path, err)
	}
	db, err := sql.Open("sqlite", DSN(path, "query_only(1)"))
	if err != nil {
		return BackupInfo{}, fmt.Errorf("sqlite: inspect %s: %w", path, err)
	}
	defer db.Close()
	info := BackupInfo{Bytes: st.Size()}
	if err := db.QueryRowContext(ctx, highWaterSQL).Scan(&info.LastSeq); err != nil {
		return BackupInfo{}, fmt.Errorf("sqlite: inspect %s: %w", path, err)
	}
	for _, m := range []struct {
		key string
		to  *int64
	}{{"published", &info.Published}, {"epoch", &info.Epoch}, {"whole_of", &info.WholeOf}} {
		if *m.to, err = readMetaInt(ctx, db, m.key); err != nil {
			return BackupInfo{}, fmt.Errorf("sqlite: inspect %s: %w", path, err)
		}
	}
	return info, nil
}

// CheckIntegrity runs PRAGMA integrity_check on a closed file.
func CheckIntegrity(ctx context.Context, path string) error {
	db, err := sql.Open("sqlite", DSN(path, "query_only(1)"))
	if err != nil {
		return err
	}
	defer db.Close()
	var res string
	if err := db.QueryRowContext(ctx, `PRAGMA integrity_check`).Scan(&res); err != nil {
		return fmt.Errorf("sqlite: integrity check of %s: %w", path, err)
	}
	if res != "ok" {
		return fmt.Errorf("sqlite: integrity check of %s: %s", path, res)
	}
	return nil
}

// ReplicatedEvent is an event as the event stream carries it, applied to a
// shard that is being rebuilt on a new owner.
type ReplicatedEvent struct {
	OutboxEvent
	// Forgotten, when set, is a forget notice for Entity rather than an
	// event: the entity's rows go.
	Forgotten bool
	// Skipped, when set, is an event of an entity forgotten since: it is
	// not stored (its key is gone), but its position is the shard's.
	Skipped bool
}

// ApplyReplicated writes events taken from the stream, in stream order, into
// the shard: events at or below the shard's last position are already there
// and skipped, so a catch-up can be re-run. It runs alone on the writer and
// moves the shard's position; the events count as published.
func (s *Shard) ApplyReplicated(ctx context.Context, evs []ReplicatedEvent) (applied int, err error) {
	err = s.Commit(ctx, &Commit{standalone: func(ctx context.Context, conn *sql.Conn) (err error) {
		s.mu.Lock()
		seq := s.lastSeq
		s.mu.Unlock()
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				_, _ = conn.ExecContext(ctx, "ROLLBACK")
			}
		}()
		// Consecutive events of one entity committed together are written
		// as one run (runs.go), as the writer wrote them; a run ends with
		// an append's idempotency record, which names its last event.
		var run []ReplicatedEvent
		flush := func() error {
			if len(run) == 0 {
				return nil
			}
			last := run[len(run)-1]
			payloads := make([][]byte, len(run))
			for i, e := range run {
				payloads[i] = e.Payload
			}
			run = run[:0]
			if _, err := conn.ExecContext(ctx, `INSERT INTO events (pos, entity, version, payload, time, n) VALUES (?, ?, ?, ?, ?, ?)`,
				last.Seq, last.Entity, last.Version, FrameRun(payloads), last.Time, len(payloads)); err != nil {
				return fmt.Errorf("sqlite: apply replicated event %d: %w", last.Seq, err)
			}
			if _, err := conn.ExecContext(ctx, `INSERT INTO entities (entity, version, created_at, updated_at) VALUES (?, ?, ?, ?)
				ON CONFLICT (entity) DO UPDATE SET version = max(version, excluded.version), updated_at = max(updated_at, excluded.updated_at)`,
				last.Entity, last.Version, last.Time, last.Time); err != nil {
				return fmt.Errorf("sqlite: apply replicated event %d: %w", last.Seq, err)
			}
			if last.Idempotency != "" {
				if _, err := conn.ExecContext(ctx, `INSERT OR IGNORE INTO idempotency (entity, key, first_version, last_version, time, pos) VALUES (?, ?, ?, ?, ?, ?)`,
					last.Entity, last.Idempotency, last.FirstVersion, last.Version, last.Time, last.Seq); err != nil {
					return fmt.Errorf("sqlite: apply replicated event %d: %w", last.Seq, err)
				}
			}
			return nil
		}
		for _, e := range evs {
			if e.Forgotten {
				if err := flush(); err != nil {
					return err
				}
				if err := purgeRows(ctx, conn, e.Entity); err != nil {
					return err
				}
				continue
			}
			if e.Seq <= seq {
				continue
			}
			if e.Skipped {
				if err := flush(); err != nil {
					return err
				}
				seq = e.Seq
				continue
			}
			if n := len(run); n > 0 {
				prev := run[n-1]
				if e.Entity != prev.Entity || e.Seq != prev.Seq+1 || e.Version != prev.Version+1 || e.Time != prev.Time {
					if err := flush(); err != nil {
						return err
					}
				}
			}
			run = append(run, e)
			if e.Idempotency != "" {
				if err := flush(); err != nil {
					return err
				}
			}
			seq = e.Seq
			applied++
		}
		if err := flush(); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES ('published', ?)`, strconv.FormatInt(seq, 10)); err != nil {
			return err
		}
		// Skipped events (of entities forgotten since) leave no row, but
		// their positions are taken: a reopen must start after them.
		if err := raiseHighWater(ctx, conn, seq); err != nil {
			return err
		}
		if err := s.fenced(ctx); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
			return err
		}
		s.mu.Lock()
		s.lastSeq = seq
		s.mu.Unlock()
		s.tailMu.Lock()
		s.tail, s.tailFrom = nil, seq+1
		s.tailMu.Unlock()
		return nil
	}})
	return applied, err
}

// cutRunAt shortens the run that holds both position pos and later ones
// (an append published in part) to its events up to pos, so that deleting
// the rows after pos keeps every event at or before it.
func cutRunAt(ctx context.Context, conn *sql.Conn, pos int64) error {
	var r run
	err := conn.QueryRowContext(ctx, `SELECT pos, version, n, payload FROM events WHERE pos > ? ORDER BY pos LIMIT 1`, pos).
		Scan(&r.pos, &r.version, &r.n, &r.payload)
	if errors.Is(err, sql.ErrNoRows) || err == nil && r.first() > pos {
		return nil
	}
	if err != nil {
		return err
	}
	ps, err := SplitRun(r.payload, r.n)
	if err != nil {
		return err
	}
	keep := pos - r.first() + 1
	_, err = conn.ExecContext(ctx, `UPDATE events SET pos = ?, version = ?, n = ?, payload = ? WHERE pos = ?`,
		pos, r.firstVersion()+keep-1, keep, FrameRun(ps[:keep]), r.pos)
	return err
}

func purgeRows(ctx context.Context, conn *sql.Conn, entity string) error {
	if err := keepHighWater(ctx, conn); err != nil {
		return err
	}
	for _, q := range []string{
		`DELETE FROM events WHERE entity = ?`,
		`DELETE FROM snapshots WHERE entity = ?`,
		`DELETE FROM idempotency WHERE entity = ?`,
		`DELETE FROM entities WHERE entity = ?`,
		`DELETE FROM forget_pending WHERE entity = ?`,
	} {
		if _, err := conn.ExecContext(ctx, q, entity); err != nil {
			return fmt.Errorf("sqlite: purge: %w", err) // not the id: this error may be logged
		}
	}
	return nil
}

// TruncateAfter deletes every event after position pos, with the
// idempotency records and snapshots that only they backed, and rewinds the
// entities to their last remaining event. A node regaining a shard that
// another node has owned since uses it to drop what it had committed but
// never published: the stream, not this file, has the shard's history from
// there on.
func (s *Shard) TruncateAfter(ctx context.Context, pos int64) (dropped int64, err error) {
	err = s.Commit(ctx, &Commit{standalone: func(ctx context.Context, conn *sql.Conn) (err error) {
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				_, _ = conn.ExecContext(ctx, "ROLLBACK")
			}
		}()
		rows, err := conn.QueryContext(ctx, `SELECT DISTINCT entity FROM events WHERE pos > ?`, pos)
		if err != nil {
			return err
		}
		var touched []string
		for rows.Next() {
			var e string
			if err := rows.Scan(&e); err != nil {
				rows.Close()
				return err
			}
			touched = append(touched, e)
		}
		rows.Close()
		if err := conn.QueryRowContext(ctx, `SELECT COALESCE(SUM(min(n, pos - ?)), 0) FROM events WHERE pos > ?`, pos, pos).Scan(&dropped); err != nil {
			return err
		}
		if err := cutRunAt(ctx, conn, pos); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, `DELETE FROM events WHERE pos > ?`, pos); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, `DELETE FROM idempotency WHERE pos > ?`, pos); err != nil {
			return err
		}
		for _, e := range touched {
			var v, t sql.NullInt64
			if err := conn.QueryRowContext(ctx, `SELECT MAX(version), MAX(time) FROM events WHERE entity = ?`, e).Scan(&v, &t); err != nil {
				return err
			}
			if !v.Valid {
				if err := purgeRows(ctx, conn, e); err != nil {
					return err
				}
				continue
			}
			if _, err := conn.ExecContext(ctx, `UPDATE entities SET version = ?, updated_at = ? WHERE entity = ?`, v.Int64, t.Int64, e); err != nil {
				return err
			}
			if _, err := conn.ExecContext(ctx, `DELETE FROM snapshots WHERE entity = ? AND version > ?`, e, v.Int64); err != nil {
				return err
			}
		}
		if _, err := conn.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES ('published', ?)`, strconv.FormatInt(pos, 10)); err != nil {
			return err
		}
		// The positions after pos are given up: the high-water a purge
		// recorded (possibly just above) comes down with them.
		if _, err := conn.ExecContext(ctx, `UPDATE meta SET value = ? WHERE key = '`+highWaterKey+`' AND CAST(value AS INTEGER) > ?`,
			strconv.FormatInt(pos, 10), pos); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
			return err
		}
		s.mu.Lock()
		s.lastSeq = min(s.lastSeq, pos)
		last := s.lastSeq
		s.mu.Unlock()
		s.tailMu.Lock()
		s.tail, s.tailFrom = nil, last+1
		s.tailMu.Unlock()
		return nil
	}})
	return dropped, err
}
