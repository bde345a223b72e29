package entity

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
)

func (a *Actor) append(ctx context.Context, r *kuma.AppendRequest) (*kuma.AppendReply, error) {
	if err := r.Validate(a.sh.Limits); err != nil {
		return nil, err
	}
	store := a.sh.Store
	// A retry is answered before the version check: the first attempt moved
	// the version, and the retry must still see its own success. An entity
	// at version 0 has committed nothing, and its idempotency records are
	// written in the same transaction as its events, so it has none to find:
	// a new entity's first append skips the look-up.
	if r.IdempotencyKey != "" && a.version > 0 {
		rec, err := store.Idempotency(ctx, a.id, r.IdempotencyKey)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			if err := a.durable(ctx, rec.Seq); err != nil {
				return nil, err
			}
			return &kuma.AppendReply{
				Entity: a.id, FirstVersion: rec.FirstVersion, LastVersion: rec.LastVersion, Time: rec.Time,
				Position: kuma.Position{Shard: a.sh.N, Seq: rec.Seq}.String(), Duplicate: true,
			}, nil
		}
	}
	if ev := r.ExpectedVersion; ev != nil && *ev != a.version {
		return nil, kuma.VersionConflict(*ev, a.version)
	}
	if a.key == nil {
		key, err := a.sh.Keys.Get(ctx, a.sh.Context, a.id, true)
		if errors.Is(err, kuma.ErrEntityForgotten) {
			fr, ferr := a.sh.Vault.Forgotten(ctx, a.sh.Context, a.id)
			if ferr != nil {
				return nil, ferr
			}
			a.becomeForgotten(fr)
			return nil, a.forgottenError()
		}
		if err != nil {
			return nil, err
		}
		a.key = key
	}

	// Event times never go backwards within an entity, even if the clock
	// does, so that reads at a time are well defined.
	now := a.sh.Now().UTC().Truncate(time.Microsecond)
	if now.Before(a.updatedAt) {
		now = a.updatedAt
	}
	n := int64(len(r.Events))
	events := make([]kuma.Event, n)
	plains := make([][]byte, n)
	aads := make([][]byte, n)
	// The plaintexts and associated data of all the events are written
	// into two buffers sized up front, not allocated event by event.
	size := 0
	for _, in := range r.Events {
		size += binary.MaxVarintLen16 + len(in.Type) + len(in.Data)
	}
	plainBuf := make([]byte, 0, size)
	aadBuf := make([]byte, 0, int(n)*(16+len(a.sh.Context)+len(a.id)))
	for i, in := range r.Events {
		v := a.version + int64(i) + 1
		events[i] = in.Event(a.id, v, now)
		start := len(plainBuf)
		plainBuf = envelope.AppendEvent(plainBuf, in.Type, in.Data)
		plains[i] = plainBuf[start:len(plainBuf):len(plainBuf)]
		start = len(aadBuf)
		aadBuf = envelope.AppendAAD(aadBuf, envelope.PurposeEvent, a.sh.Context, a.id, v)
		aads[i] = aadBuf[start:len(aadBuf):len(aadBuf)]
	}
	sealed := a.key.SealBatch(plains, aads)
	rows := make([]sqlite.EventRow, n)
	for i := range rows {
		rows[i] = sqlite.EventRow{Version: events[i].Version, Payload: sealed[i], Time: now}
	}
	newState, err := a.sh.Reducer.Fold(a.state, events)
	if err != nil {
		var kerr *kuma.Error
		if errors.As(err, &kerr) {
			return nil, kerr
		}
		return nil, kuma.Errorf(kuma.CodeInvalidEvent, "the context's reducer refused the events: %v", err)
	}

	last := a.version + n
	c := &sqlite.Commit{Entity: a.id, Events: rows, CreatedAt: a.createdAt}
	if a.version == 0 {
		c.CreatedAt = now
	}
	if r.IdempotencyKey != "" {
		c.Idempotency = &sqlite.IdempotencyRecord{Key: r.IdempotencyKey, FirstVersion: a.version + 1, LastVersion: last, Time: now}
	}
	snapshot := a.sinceSnapshot+n >= a.sh.SnapshotEvery
	if snapshot {
		c.Snapshot = &sqlite.Snapshot{Version: last, UpdatedAt: now,
			State: a.key.Seal(nil, newState, envelope.AAD(envelope.PurposeSnapshot, a.sh.Context, a.id, last))}
	}
	if err := store.Commit(ctx, c); err != nil {
		if errors.Is(err, sqlite.ErrClosed) {
			return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d is closing; retry", a.sh.N)
		}
		if errors.Is(err, sqlite.ErrFenced) {
			a.sh.Metrics.Fenced.WithLabelValues("epoch").Inc()
			return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d has a newer owner; retry", a.sh.N)
		}
		return nil, err
	}
	if a.sh.Wrote != nil {
		a.sh.Wrote()
	}
	if err := a.durable(ctx, c.LastSeq); err != nil {
		// Stored here, not yet acknowledged: the state moves (the events
		// are the entity's history now), and a retry with the same
		// idempotency key gets the reply once the stream has them.
		a.advance(newState, now, last, n, snapshot)
		return nil, err
	}

	// Only now, durable, does the actor's state move.
	a.advance(newState, now, last, n, snapshot)
	return &kuma.AppendReply{
		Entity: a.id, FirstVersion: last - n + 1, LastVersion: last, Time: now,
		Position: kuma.Position{Shard: a.sh.N, Seq: c.LastSeq}.String(),
	}, nil
}

// advance moves the actor's state past a committed append.
func (a *Actor) advance(newState json.RawMessage, now time.Time, last, n int64, snapshot bool) {
	if a.version == 0 {
		a.createdAt = now
	}
	a.version, a.state, a.updatedAt = last, newState, now
	if snapshot {
		a.sinceSnapshot = 0
	} else {
		a.sinceSnapshot += n
	}
}

// durable waits, under the replicated durability setting, until the event
// stream holds position seq; under local the fsync was enough.
func (a *Actor) durable(ctx context.Context, seq int64) error {
	if !a.sh.Replicated {
		return nil
	}
	return a.sh.WaitPublished(ctx, seq)
}
