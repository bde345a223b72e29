package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// EntityRecord is an entity's row: its current version and times.
type EntityRecord struct {
	Version   int64
	CreatedAt time.Time
	UpdatedAt time.Time
}

// StoredEvent is an event as read back.
type StoredEvent struct {
	Seq     int64
	Version int64
	Payload []byte
	Time    time.Time
}

func fromNanos(n int64) time.Time { return time.Unix(0, n).UTC() }

// Entity returns the entity's row, or ok=false for an entity never written.
func (s *Shard) Entity(ctx context.Context, entity string) (rec EntityRecord, ok bool, err error) {
	var created, updated int64
	err = s.reads.entity.QueryRowContext(ctx, entity).
		Scan(&rec.Version, &created, &updated)
	if errors.Is(err, sql.ErrNoRows) {
		return EntityRecord{}, false, nil
	}
	if err != nil {
		return EntityRecord{}, false, s.noteErr(fmt.Errorf("sqlite: read entity: %w", err))
	}
	rec.CreatedAt, rec.UpdatedAt = fromNanos(created), fromNanos(updated)
	return rec, true, nil
}

// LatestSnapshot returns the entity's newest snapshot at or below maxVersion,
// or nil when there is none.
func (s *Shard) LatestSnapshot(ctx context.Context, entity string, maxVersion int64) (*Snapshot, error) {
	var sn Snapshot
	var updated int64
	err := s.reads.latestSnapshot.QueryRowContext(ctx, entity, maxVersion).
		Scan(&sn.Version, &sn.State, &updated)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, s.noteErr(fmt.Errorf("sqlite: read snapshot: %w", err))
	}
	sn.UpdatedAt = fromNanos(updated)
	return &sn, nil
}

// Events returns the entity's events with fromVersion <= version <= toVersion,
// in version order, at most limit of them (limit <= 0: no limit).
func (s *Shard) Events(ctx context.Context, entity string, fromVersion, toVersion int64, limit int) ([]StoredEvent, error) {
	// The runs that end at or after fromVersion, in version order (the
	// index on entity, version), until one starts after toVersion.
	rows, err := s.rdb.QueryContext(ctx,
		`SELECT pos, version, n, payload, time FROM events
		 WHERE entity = ? AND version >= ? ORDER BY version`,
		entity, fromVersion)
	if err != nil {
		return nil, s.noteErr(fmt.Errorf("sqlite: read events: %w", err))
	}
	defer rows.Close()
	var out []StoredEvent
	full := func() bool { return limit > 0 && len(out) >= limit }
	for !full() && rows.Next() {
		var r run
		if err := rows.Scan(&r.pos, &r.version, &r.n, &r.payload, &r.time); err != nil {
			return nil, s.noteErr(fmt.Errorf("sqlite: read events: %w", err))
		}
		if r.firstVersion() > toVersion {
			break
		}
		t := fromNanos(r.time)
		err := r.events(func(pos, version int64, payload []byte) bool {
			if version >= fromVersion && version <= toVersion {
				out = append(out, StoredEvent{Seq: pos, Version: version, Payload: payload, Time: t})
			}
			return version < toVersion && !full()
		})
		if err != nil {
			return nil, s.noteErr(err)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, s.noteErr(fmt.Errorf("sqlite: read events: %w", err))
	}
	return out, nil
}

// VersionAt returns the entity's last version whose event time is at or
// before t, or 0 when the entity did not exist yet at t. Event times never
// decrease within an entity, so this is the state "as it was at t".
func (s *Shard) VersionAt(ctx context.Context, entity string, t time.Time) (int64, error) {
	var v sql.NullInt64
	err := s.rdb.QueryRowContext(ctx,
		`SELECT MAX(version) FROM events WHERE entity = ? AND time <= ?`, entity, t.UnixNano()).Scan(&v)
	if err != nil {
		return 0, s.noteErr(fmt.Errorf("sqlite: find version at time: %w", err))
	}
	return v.Int64, nil
}

// Idempotency returns the record of an earlier append with this key, or nil.
func (s *Shard) Idempotency(ctx context.Context, entity, key string) (*IdempotencyRecord, error) {
	r := IdempotencyRecord{Key: key}
	var t int64
	err := s.reads.idempotency.QueryRowContext(ctx,
		entity, IdempotencyDigest(key), key).Scan(&r.FirstVersion, &r.LastVersion, &t, &r.Seq)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, s.noteErr(fmt.Errorf("sqlite: read idempotency key: %w", err))
	}
	r.Time = fromNanos(t)
	return &r, nil
}

// Counts returns the number of entities and events in the shard.
func (s *Shard) Counts(ctx context.Context) (entities, events int64, err error) {
	if err := s.rdb.QueryRowContext(ctx, `SELECT COUNT(*) FROM entities`).Scan(&entities); err != nil {
		return 0, 0, s.noteErr(fmt.Errorf("sqlite: count entities: %w", err))
	}
	return entities, s.LastSeq(), nil
}
