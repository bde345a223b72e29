package shardnode

import (
	"container/list"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go"
)

// request is one message for an actor.
type request struct {
	op  string
	msg *nats.Msg
}

// ioTimeout bounds one request's reads from the shard file.
const ioTimeout = 30 * time.Second

// actor is the single writer of one entity. Its goroutine handles one request
// at a time, in arrival order, so version checks and version assignment need
// no locks. The folded state lives here between requests; the shard file is
// the record it can be rebuilt from.
type actor struct {
	sh      *shard
	id      string
	mailbox chan *request
	pending atomic.Int32
	// elem and lastUsed are guarded by sh.mu.
	elem     *list.Element
	lastUsed time.Time

	loaded        bool
	version       int64
	state         json.RawMessage
	createdAt     time.Time
	updatedAt     time.Time
	sinceSnapshot int64
}

func newActor(sh *shard, id string) *actor {
	return &actor{sh: sh, id: id, mailbox: make(chan *request, sh.node.cfg.MailboxLen)}
}

func (a *actor) run() {
	defer a.sh.actorsWG.Done()
	for req := range a.mailbox {
		a.handle(req)
		a.pending.Add(-1)
	}
}

func (a *actor) handle(req *request) {
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	reply, err := a.serve(ctx, req)
	nc := a.sh.node.nc
	if err != nil {
		if kuma.ErrorCode(err) == kuma.CodeInternal {
			a.sh.node.cfg.Logger.Error("request failed", "context", a.sh.cc.Name, "shard", a.sh.n,
				"entity", a.id, "op", req.op, "err", err)
		}
		err = natsbus.RespondError(nc, req.msg, err)
	} else {
		err = natsbus.RespondJSON(nc, req.msg, reply)
	}
	if err != nil {
		a.sh.node.cfg.Logger.Warn("reply failed", "entity", a.id, "op", req.op, "err", err)
	}
}

func (a *actor) serve(ctx context.Context, req *request) (any, error) {
	if err := a.load(ctx); err != nil {
		return nil, err
	}
	switch req.op {
	case kuma.OpAppend:
		var r kuma.AppendRequest
		if err := kuma.Decode(req.msg.Data, &r); err != nil {
			return nil, err
		}
		return a.append(ctx, &r)
	case kuma.OpRead:
		var r kuma.ReadRequest
		if err := kuma.Decode(req.msg.Data, &r); err != nil {
			return nil, err
		}
		return a.read(ctx, &r)
	case kuma.OpHistory:
		var r kuma.HistoryRequest
		if err := kuma.Decode(req.msg.Data, &r); err != nil {
			return nil, err
		}
		return a.history(ctx, &r)
	case kuma.OpExport:
		return a.export(ctx, req.msg)
	}
	return nil, kuma.Errorf(kuma.CodeNotFound, "unknown operation %q", req.op)
}

// load brings the entity back from its latest snapshot plus the events after
// it. A failed load is retried by the next request.
func (a *actor) load(ctx context.Context) error {
	if a.loaded {
		return nil
	}
	store := a.sh.store
	rec, ok, err := store.Entity(ctx, a.id)
	if err != nil {
		return err
	}
	if !ok {
		a.loaded = true
		return nil
	}
	state, _, err := a.stateAt(ctx, rec.Version)
	if err != nil {
		return err
	}
	a.version, a.state = rec.Version, state
	a.createdAt, a.updatedAt = rec.CreatedAt, rec.UpdatedAt
	a.sinceSnapshot = rec.Version % a.sh.node.cfg.SnapshotEvery
	a.loaded = true
	return nil
}

// stateAt folds the entity up to version v from the nearest snapshot and
// returns the state and the time of event v.
func (a *actor) stateAt(ctx context.Context, v int64) (json.RawMessage, time.Time, error) {
	store := a.sh.store
	snap, err := store.LatestSnapshot(ctx, a.id, v)
	if err != nil {
		return nil, time.Time{}, err
	}
	var state json.RawMessage
	from, at := int64(1), time.Time{}
	if snap != nil {
		state, from, at = snap.State, snap.Version+1, snap.UpdatedAt
	}
	if from > v {
		return state, at, nil
	}
	stored, err := store.Events(ctx, a.id, from, v, 0)
	if err != nil {
		return nil, time.Time{}, err
	}
	if int64(len(stored)) != v-from+1 {
		return nil, time.Time{}, fmt.Errorf("entity %s: found %d events for versions %d..%d", a.id, len(stored), from, v)
	}
	events := make([]kuma.Event, len(stored))
	for i, e := range stored {
		events[i] = kuma.Event{Entity: a.id, Version: e.Version, Type: e.Type, Data: e.Data, Time: e.Time}
	}
	state, err = a.sh.cc.Reducer.Fold(state, events)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("entity %s: fold stored events: %w", a.id, err)
	}
	return state, stored[len(stored)-1].Time, nil
}

func (a *actor) append(ctx context.Context, r *kuma.AppendRequest) (*kuma.AppendReply, error) {
	if err := r.Validate(a.sh.cc.Limits); err != nil {
		return nil, err
	}
	store := a.sh.store
	// A retry is answered before the version check: the first attempt moved
	// the version, and the retry must still see its own success.
	if r.IdempotencyKey != "" {
		rec, err := store.Idempotency(ctx, a.id, r.IdempotencyKey)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			return &kuma.AppendReply{
				Entity: a.id, FirstVersion: rec.FirstVersion, LastVersion: rec.LastVersion, Time: rec.Time,
				Position: kuma.Position{Shard: a.sh.n, Seq: rec.Seq}.String(), Duplicate: true,
			}, nil
		}
	}
	if ev := r.ExpectedVersion; ev != nil && *ev != a.version {
		return nil, kuma.VersionConflict(*ev, a.version)
	}

	// Event times never go backwards within an entity, even if the clock
	// does, so that reads at a time are well defined.
	now := a.sh.node.cfg.Now().UTC().Truncate(time.Microsecond)
	if now.Before(a.updatedAt) {
		now = a.updatedAt
	}
	n := int64(len(r.Events))
	events := make([]kuma.Event, n)
	rows := make([]sqlite.EventRow, n)
	for i, in := range r.Events {
		v := a.version + int64(i) + 1
		events[i] = kuma.Event{Entity: a.id, Version: v, Type: in.Type, Data: in.Data, Time: now}
		rows[i] = sqlite.EventRow{Version: v, Type: in.Type, Data: in.Data, Time: now}
	}
	newState, err := a.sh.cc.Reducer.Fold(a.state, events)
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
	snapshot := a.sinceSnapshot+n >= a.sh.node.cfg.SnapshotEvery
	if snapshot {
		c.Snapshot = &sqlite.Snapshot{Version: last, State: newState, UpdatedAt: now}
	}
	if err := store.Commit(ctx, c); err != nil {
		if errors.Is(err, sqlite.ErrClosed) {
			return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d is closing; retry", a.sh.n)
		}
		return nil, err
	}

	// Only now, durable, does the actor's state move.
	if a.version == 0 {
		a.createdAt = now
	}
	a.version, a.state, a.updatedAt = last, newState, now
	if snapshot {
		a.sinceSnapshot = 0
	} else {
		a.sinceSnapshot += n
	}
	return &kuma.AppendReply{
		Entity: a.id, FirstVersion: last - n + 1, LastVersion: last, Time: now,
		Position: kuma.Position{Shard: a.sh.n, Seq: c.LastSeq}.String(),
	}, nil
}

func (a *actor) notFound() error {
	return kuma.Errorf(kuma.CodeNotFound, "entity %q has no events", a.id)
}

func (a *actor) read(ctx context.Context, r *kuma.ReadRequest) (*kuma.ReadReply, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.notFound()
	}
	v := a.version
	switch {
	case r.AtVersion != nil:
		if *r.AtVersion > a.version {
			return nil, &kuma.Error{Code: kuma.CodeNotFound,
				Message: fmt.Sprintf("entity %q has no version %d; it is at version %d", a.id, *r.AtVersion, a.version),
				Details: map[string]any{"actual_version": a.version}}
		}
		v = *r.AtVersion
	case r.AtTime != nil:
		at, err := a.sh.store.VersionAt(ctx, a.id, *r.AtTime)
		if err != nil {
			return nil, err
		}
		if at == 0 {
			return nil, kuma.Errorf(kuma.CodeNotFound, "entity %q did not exist yet at %s", a.id, r.AtTime.UTC().Format(time.RFC3339Nano))
		}
		v = at
	}
	if v == a.version {
		return &kuma.ReadReply{Entity: a.id, Version: a.version, State: a.state, CreatedAt: a.createdAt, UpdatedAt: a.updatedAt}, nil
	}
	state, at, err := a.stateAt(ctx, v)
	if err != nil {
		return nil, err
	}
	return &kuma.ReadReply{Entity: a.id, Version: v, State: state, CreatedAt: a.createdAt, UpdatedAt: at}, nil
}

func recorded(stored []sqlite.StoredEvent) []kuma.RecordedEvent {
	out := make([]kuma.RecordedEvent, len(stored))
	for i, e := range stored {
		out[i] = kuma.RecordedEvent{Version: e.Version, Type: e.Type, Data: e.Data, Time: e.Time}
	}
	return out
}

func (a *actor) history(ctx context.Context, r *kuma.HistoryRequest) (*kuma.HistoryReply, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.notFound()
	}
	out := &kuma.HistoryReply{Entity: a.id, Events: []kuma.RecordedEvent{}}
	if r.FromVersion > a.version {
		return out, nil
	}
	stored, err := a.sh.store.Events(ctx, a.id, r.FromVersion, a.version, r.Limit)
	if err != nil {
		return nil, err
	}
	out.Events = recorded(stored)
	if n := len(stored); n > 0 && stored[n-1].Version < a.version {
		next := stored[n-1].Version + 1
		out.NextVersion = &next
	}
	return out, nil
}

func (a *actor) export(ctx context.Context, msg *nats.Msg) (json.RawMessage, error) {
	if len(msg.Data) > 0 {
		var empty struct{}
		if err := kuma.Decode(msg.Data, &empty); err != nil {
			return nil, err
		}
	}
	if a.version == 0 {
		return nil, a.notFound()
	}
	stored, err := a.sh.store.Events(ctx, a.id, 1, a.version, 0)
	if err != nil {
		return nil, err
	}
	out := &kuma.ExportReply{Entity: a.id, Version: a.version, State: a.state, Events: recorded(stored),
		ExportedAt: a.sh.node.cfg.Now().UTC()}
	// Leave room for headers; a reply over the server's limit would be lost.
	b, err := json.Marshal(out)
	if err != nil {
		return nil, err
	}
	if limit := a.sh.node.nc.MaxPayload(); int64(len(b))+1024 > limit {
		return nil, &kuma.Error{Code: kuma.CodePayloadTooLarge,
			Message: fmt.Sprintf("export of %q is %d bytes, over the %d-byte message limit; page it with history", a.id, len(b), limit),
			Details: map[string]any{"version": a.version}}
	}
	return b, nil
}
