package shardnode

import (
	"container/list"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// request is one message for an actor.
type request struct {
	op  string
	msg *nats.Msg
	ctx context.Context // carries the caller's trace context
}

// ioTimeout bounds one request's reads from the shard file.
const ioTimeout = 30 * time.Second

// actor is the single writer of one entity. Its goroutine handles one request
// at a time, in arrival order, so version checks and version assignment need
// no locks. The folded state lives here between requests; the shard file is
// the record it can be rebuilt from.
//
// The goroutine runs only while the actor has requests: it starts with the
// first one queued and ends when the queue is empty. A live actor that is
// idle is only its state, so the node can hold MaxActors of them (100,000)
// without as many goroutine stacks and channel buffers (about 10 KiB each).
type actor struct {
	sh      *shard
	id      string
	pending atomic.Int32
	// queue is the mailbox: requests in arrival order, at most MailboxLen.
	// running is set while a goroutine drains it; it and queue are guarded
	// by qmu.
	qmu     sync.Mutex
	queue   []*request
	running bool
	// elem and lastUsed are guarded by sh.mu.
	elem     *list.Element
	lastUsed time.Time

	loaded           bool
	checkedForgotten bool
	key              *envelope.Key     // the entity's data key, once it has one
	forgotten        *kuma.ForgetReply // set once the entity is erased
	version          int64
	state            json.RawMessage
	createdAt        time.Time
	updatedAt        time.Time
	sinceSnapshot    int64
}

func newActor(sh *shard, id string) *actor {
	return &actor{sh: sh, id: id}
}

// enqueue adds req to the mailbox and starts the goroutine if none runs. It
// reports false, queueing nothing, when the mailbox is full.
func (a *actor) enqueue(req *request) bool {
	a.qmu.Lock()
	if len(a.queue) >= a.sh.node.cfg.MailboxLen {
		a.qmu.Unlock()
		return false
	}
	a.queue = append(a.queue, req)
	start := !a.running
	if start {
		a.running = true
		// Before the shard's stop waits on actorsWG: a dispatch holds
		// sendsWG, which the stop waits out first.
		a.sh.actorsWG.Add(1)
	}
	a.qmu.Unlock()
	if start {
		go a.run()
	}
	return true
}

// run handles the queued requests in order and ends once none is left.
func (a *actor) run() {
	defer a.sh.actorsWG.Done()
	for {
		a.qmu.Lock()
		if len(a.queue) == 0 {
			a.queue, a.running = nil, false
			a.qmu.Unlock()
			return
		}
		req := a.queue[0]
		a.queue[0] = nil
		a.queue = a.queue[1:]
		a.qmu.Unlock()
		a.handle(req)
		a.pending.Add(-1)
	}
}

func (a *actor) handle(req *request) {
	ctx, span := a.sh.node.tracer.Start(req.ctx, "kuma.shardnode "+req.op, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("kuma.entity", a.id), attribute.Int("kuma.shard", a.sh.n)))
	defer span.End()
	ctx, cancel := context.WithTimeout(ctx, ioTimeout)
	defer cancel()
	reply, err := a.serve(ctx, req)
	err, reported := a.sh.storageError(err) // corrupt.go
	var body []byte
	if err == nil {
		// Encoded and measured before it is counted: an answer NATS
		// cannot carry is counted and sent as payload_too_large, never
		// counted ok and lost.
		var fits bool
		if body, fits, err = natsbus.EncodeReply(reply, a.sh.maxReply); err == nil && !fits {
			err = a.tooLarge(req.op, reply, len(body))
		}
	}
	code := "ok"
	if err != nil {
		code = string(kuma.ErrorCode(err))
		span.SetStatus(codes.Error, code)
	}
	m := a.sh.node.metrics
	m.requests.WithLabelValues(req.op, code).Inc()
	if r, ok := reply.(*kuma.AppendReply); ok && err == nil && !r.Duplicate {
		m.appended.Add(float64(r.LastVersion - r.FirstVersion + 1))
	}
	nc := a.sh.node.nc
	if err != nil {
		if kuma.ErrorCode(err) == kuma.CodeInternal && !reported {
			a.sh.node.cfg.Logger.ErrorContext(ctx, "request failed", "context", a.sh.cc.Name, "shard", a.sh.n,
				"entity", a.id, "op", req.op, "err", err)
		}
		err = natsbus.RespondError(nc, req.msg, err)
	} else {
		err = natsbus.RespondBody(nc, req.msg, body)
		a.afterAck(reply)
	}
	if err != nil {
		m.replyFailed(req.op, err)
		// The shard, not the id: logs outlive a forget.
		a.sh.node.cfg.Logger.Warn("reply failed", "shard", a.sh.n, "op", req.op, "err", err)
	}
}

// tooLarge is the payload_too_large answer to op when its reply of size
// bytes does not fit in one message: it says what the client can do instead.
func (a *actor) tooLarge(op string, reply any, size int) *kuma.Error {
	limit := a.sh.maxReply
	switch r := reply.(type) {
	case *kuma.ReadReply:
		e := natsbus.TooLarge(size, limit, fmt.Sprintf("the state of %q at version %d", a.id, r.Version),
			"page its events with history, or read an earlier version with at_version")
		e.Details["version"] = r.Version
		return e
	case *kuma.ExportReply:
		e := natsbus.TooLarge(size, limit, fmt.Sprintf("the export of %q", a.id),
			"page its events with history instead, from_version 1 until next_version is null")
		e.Details["version"] = r.Version
		return e
	}
	return natsbus.TooLarge(size, limit, fmt.Sprintf("the answer to %s of %q", op, a.id),
		"raise the NATS server's max_payload")
}

// afterAck is the fault tests' after-ack-before-publish point: the reply to
// a new append has been handed to NATS and the relay has not published its
// events yet. The relay's own relay-before-publish point cannot stand in
// for it: the writer wakes the relay before it answers the commit, so the
// relay may reach its publish before the reply is sent.
func (a *actor) afterAck(reply any) {
	if !a.sh.node.hooked {
		return // no fault test: nothing to call, so no position to parse
	}
	r, ok := reply.(*kuma.AppendReply)
	if !ok || r.Duplicate {
		return
	}
	if p, err := kuma.ParsePosition(r.Position); err == nil && a.sh.relay.published.Load() < p.Seq {
		a.sh.node.cfg.Failpoint("append-after-ack")
	}
}

func (a *actor) serve(ctx context.Context, req *request) (any, error) {
	// A damaged file answers nothing, not even from memory: requests
	// queued before it was found get the same answer as those after.
	if err := a.sh.store.Corrupt(); err != nil {
		return nil, err
	}
	if err := a.load(ctx); err != nil {
		return nil, err
	}
	if req.op == kuma.OpForget {
		var r kuma.ForgetRequest
		if err := kuma.Decode(req.msg.Data, &r); err != nil {
			return nil, err
		}
		by := "unknown"
		if req.msg.Header != nil && req.msg.Header.Get(kuma.HeaderRequestedBy) != "" {
			by = req.msg.Header.Get(kuma.HeaderRequestedBy)
		}
		return a.forget(ctx, &r, by)
	}
	if a.forgotten != nil {
		return nil, a.forgottenError()
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
		// Never written, or forgotten: that is asked of the keyvault only
		// when it matters (missing), so creating an entity costs one call.
		a.loaded = true
		return nil
	}
	key, err := a.sh.node.keys.Get(ctx, a.sh.cc.Name, a.id, false)
	if errors.Is(err, kuma.ErrEntityForgotten) {
		// The key was shredded but the rows were not deleted yet (a forget
		// interrupted in this process's life): finish it now.
		fr, err := a.sh.erase(ctx, sqlite.PendingForget{Entity: a.id, RequestedBy: "recovery", RequestedAt: a.sh.node.cfg.Now().UTC()}, rec.Version)
		if err != nil {
			return err
		}
		a.becomeForgotten(fr)
		a.loaded = true
		return nil
	}
	if err != nil {
		if errors.Is(err, kuma.ErrNotFound) {
			return fmt.Errorf("entity %s has events but the keyvault has no key for it", a.id)
		}
		return err
	}
	a.key = key
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
		plain, err := a.key.Open(snap.State, envelope.AAD(envelope.PurposeSnapshot, a.sh.cc.Name, a.id, snap.Version))
		if err != nil {
			return nil, time.Time{}, a.tampered("snapshot", snap.Version)
		}
		state, from, at = plain, snap.Version+1, snap.UpdatedAt
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
	opened, err := a.open(stored)
	if err != nil {
		return nil, time.Time{}, err
	}
	events := make([]kuma.Event, len(opened))
	for i, e := range opened {
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
				Position: kuma.Position{Shard: a.sh.n, Seq: rec.Seq}.String(), Duplicate: true,
			}, nil
		}
	}
	if ev := r.ExpectedVersion; ev != nil && *ev != a.version {
		return nil, kuma.VersionConflict(*ev, a.version)
	}
	if a.key == nil {
		key, err := a.sh.node.keys.Get(ctx, a.sh.cc.Name, a.id, true)
		if errors.Is(err, kuma.ErrEntityForgotten) {
			fr, ferr := a.sh.node.cfg.Keys.Forgotten(ctx, a.sh.cc.Name, a.id)
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
	now := a.sh.node.cfg.Now().UTC().Truncate(time.Microsecond)
	if now.Before(a.updatedAt) {
		now = a.updatedAt
	}
	n := int64(len(r.Events))
	events := make([]kuma.Event, n)
	plains := make([][]byte, n)
	aads := make([][]byte, n)
	for i, in := range r.Events {
		v := a.version + int64(i) + 1
		events[i] = kuma.Event{Entity: a.id, Version: v, Type: in.Type, Data: in.Data, Time: now}
		plains[i] = envelope.EncodeEvent(in.Type, in.Data)
		aads[i] = envelope.AAD(envelope.PurposeEvent, a.sh.cc.Name, a.id, v)
	}
	sealed := a.key.SealBatch(plains, aads)
	rows := make([]sqlite.EventRow, n)
	for i := range rows {
		rows[i] = sqlite.EventRow{Version: events[i].Version, Payload: sealed[i], Time: now}
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
		c.Snapshot = &sqlite.Snapshot{Version: last, UpdatedAt: now,
			State: a.key.Seal(nil, newState, envelope.AAD(envelope.PurposeSnapshot, a.sh.cc.Name, a.id, last))}
	}
	if err := store.Commit(ctx, c); err != nil {
		if errors.Is(err, sqlite.ErrClosed) {
			return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d is closing; retry", a.sh.n)
		}
		if errors.Is(err, sqlite.ErrFenced) {
			a.sh.node.metrics.fenced.WithLabelValues("epoch").Inc()
			return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d has a newer owner; retry", a.sh.n)
		}
		return nil, err
	}
	a.sh.wrote()
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
		Position: kuma.Position{Shard: a.sh.n, Seq: c.LastSeq}.String(),
	}, nil
}

// advance moves the actor's state past a committed append.
func (a *actor) advance(newState json.RawMessage, now time.Time, last, n int64, snapshot bool) {
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
func (a *actor) durable(ctx context.Context, seq int64) error {
	if a.sh.cc.Durability != DurabilityReplicated {
		return nil
	}
	return a.sh.relay.waitPublished(ctx, seq)
}

// missing answers for an entity with no events here: entity_forgotten if the
// keyvault remembers it as forgotten, else not_found.
func (a *actor) missing(ctx context.Context) error {
	if !a.checkedForgotten {
		fr, err := a.sh.node.cfg.Keys.Forgotten(ctx, a.sh.cc.Name, a.id)
		if err != nil {
			return err
		}
		a.checkedForgotten = true
		if fr != nil {
			a.becomeForgotten(fr)
		}
	}
	if a.forgotten != nil {
		return a.forgottenError()
	}
	return kuma.Errorf(kuma.CodeNotFound, "entity %q has no events", a.id)
}

func (a *actor) read(ctx context.Context, r *kuma.ReadRequest) (*kuma.ReadReply, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.missing(ctx)
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

// open decrypts stored events. A payload that does not open (tampered, or
// moved from another entity or version) is an internal error, logged, and
// never returned as data.
func (a *actor) open(stored []sqlite.StoredEvent) ([]kuma.RecordedEvent, error) {
	out := make([]kuma.RecordedEvent, len(stored))
	for i, e := range stored {
		plain, err := a.key.Open(e.Payload, envelope.AAD(envelope.PurposeEvent, a.sh.cc.Name, a.id, e.Version))
		if err != nil {
			return nil, a.tampered("event", e.Version)
		}
		typ, data, err := envelope.DecodeEvent(plain)
		if err != nil {
			return nil, a.tampered("event", e.Version)
		}
		out[i] = kuma.RecordedEvent{Version: e.Version, Type: typ, Data: data, Time: e.Time}
	}
	return out, nil
}

func (a *actor) tampered(what string, version int64) error {
	a.sh.node.cfg.Logger.Error("sealed data does not open: tampered, misplaced or wrong key",
		"context", a.sh.cc.Name, "shard", a.sh.n, "entity", a.id, "what", what, "version", version)
	return kuma.Errorf(kuma.CodeInternal, "internal error")
}

func (a *actor) forgottenError() error {
	return &kuma.Error{Code: kuma.CodeEntityForgotten,
		Message: fmt.Sprintf("entity %q was forgotten at %s", a.id, a.forgotten.ForgottenAt.Format(time.RFC3339Nano))}
}

// history answers one page of events from r.FromVersion: at most r.Limit
// events, and no more than fit in one answer of a.sh.maxReply bytes, so
// that a page of large events is cut short (next_version says where to go
// on) instead of being lost. The page is encoded here, each event once, to
// measure it; the bytes are what json.Marshal makes of a HistoryReply.
func (a *actor) history(ctx context.Context, r *kuma.HistoryRequest) (any, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.missing(ctx)
	}
	if r.FromVersion > a.version {
		return &kuma.HistoryReply{Entity: a.id, Events: []kuma.RecordedEvent{}}, nil
	}
	stored, err := a.sh.store.Events(ctx, a.id, r.FromVersion, a.version, r.Limit)
	if err != nil {
		return nil, err
	}
	id, err := json.Marshal(a.id)
	if err != nil {
		return nil, err
	}
	// The reply around the events, with room for the longest next_version.
	const around = len(`{"entity":,"events":,"next_version":-9223372036854775808}`)
	page := natsbus.NewPage(a.sh.maxReply, around+len(id))
	var next *int64
	for i := range stored {
		// Opened one at a time: the events past the cut are not
		// decrypted for nothing.
		ev, err := a.open(stored[i : i+1])
		if err != nil {
			return nil, err
		}
		fits, size, err := page.Add(&ev[0])
		if err != nil {
			return nil, err
		}
		if fits {
			continue
		}
		v := ev[0].Version
		if page.Len() == 0 {
			e := natsbus.TooLarge(size+around+len(id)+2, a.sh.maxReply, fmt.Sprintf("event %d of %q", v, a.id),
				fmt.Sprintf("no page can hold it until the NATS server's max_payload is raised; history from_version %d goes on after it", v+1))
			e.Details["version"] = v
			return nil, e
		}
		next = &v
		break
	}
	if n := len(stored); next == nil && n > 0 && stored[n-1].Version < a.version {
		v := stored[n-1].Version + 1
		next = &v
	}
	b := make([]byte, 0, len(id)+around+page.Size())
	b = append(append(append(b, `{"entity":`...), id...), `,"events":`...)
	b = append(page.AppendTo(b), `,"next_version":`...)
	if next == nil {
		b = append(b, "null"...)
	} else {
		b = strconv.AppendInt(b, *next, 10)
	}
	return json.RawMessage(append(b, '}')), nil
}

// export answers everything held about the entity. The answer passes the
// same size check as every other (handle): an entity too large for one
// message answers payload_too_large, and the client pages history.
func (a *actor) export(ctx context.Context, msg *nats.Msg) (*kuma.ExportReply, error) {
	if err := kuma.DecodeEmpty(msg.Data); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.missing(ctx)
	}
	stored, err := a.sh.store.Events(ctx, a.id, 1, a.version, 0)
	if err != nil {
		return nil, err
	}
	events, err := a.open(stored)
	if err != nil {
		return nil, err
	}
	return &kuma.ExportReply{Entity: a.id, Version: a.version, State: a.state, Events: events,
		ExportedAt: a.sh.node.cfg.Now().UTC()}, nil
}
