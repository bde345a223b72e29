// Package entity is the entity actor: the single writer of one entity, which
// takes decoded requests in arrival order and answers each with an encoded
// body or an error. It knows nothing of NATS (the shardnode's endpoints
// decode messages into Requests and send the answers) nor of the shardnode:
// what it needs of its shard and node comes in a Shard, built once per
// shard. So it runs, and is tested, on a bare SQLite file.
package entity

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/replysize"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Request is one request for an actor, as its endpoint decoded it from the
// wire.
type Request struct {
	// Op is the operation (kuma.OpAppend, ...); Body its JSON body, which
	// the actor decodes itself, after the checks that come first (a
	// forgotten entity answers entity_forgotten whatever the body).
	Op   string
	Body []byte
	// RequestedBy names who asked for a forget ("" when nobody said).
	RequestedBy string
	// Ctx carries the caller's trace context, and ends when the shard
	// gives up on its requests.
	Ctx context.Context
	// Reply sends the answer: body on success, else err (a *kuma.Error or
	// an internal error). It is called once per request, on the actor's
	// goroutine, after the request is counted; what it cannot send is its
	// own to count and log.
	Reply func(ctx context.Context, body []byte, err error)
}

// Keys gives the data key of an entity (creating one when create is set):
// kuma.ErrNotFound when it has none, kuma.ErrEntityForgotten when it was
// shredded. The shardnode's key cache implements it.
type Keys interface {
	Get(ctx context.Context, kctx, entity string, create bool) (*envelope.Key, error)
}

// Vault tells whether an entity was forgotten: its forget record, or nil.
// The keyvault implements it.
type Vault interface {
	Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error)
}

// Metrics are the collectors an actor counts into; the shardnode registers
// them.
type Metrics struct {
	Requests *prometheus.CounterVec // by op and protocol code ("ok")
	Appended prometheus.Counter     // events committed by appends
	Fenced   *prometheus.CounterVec // by reason; actors count "epoch"
}

// Shard is what the actors of one shard share: the shard's file and
// settings, and the services of the node. The shardnode builds one per open
// shard; it is read-only once an actor has it.
type Shard struct {
	Context string // the context's name
	N       int    // the shard's number
	Reducer kuma.Reducer
	Limits  kuma.Limits
	// Replicated: an append is answered once the event stream holds it
	// (WaitPublished), not at the local fsync.
	Replicated bool
	// SnapshotEvery writes an entity snapshot every this many events.
	SnapshotEvery int64
	// MailboxLen bounds the requests waiting for one actor.
	MailboxLen int
	// MaxReply is the largest answer body: larger history pages are cut,
	// larger states refused as payload_too_large.
	MaxReply int

	Store *sqlite.Shard
	Keys  Keys
	Vault Vault
	// Erase shreds a forgotten entity's key, announces it and deletes its
	// rows (steps 2 to 4 of forget), returning the forget record.
	Erase func(ctx context.Context, p sqlite.PendingForget, events int64) (*kuma.ForgetReply, error)
	// WaitPublished returns once the event stream holds position seq;
	// Published is the position it is known to hold.
	WaitPublished func(ctx context.Context, seq int64) error
	Published     func() int64
	// StorageError turns what the file said into the protocol's answer
	// (a damaged file, a full disk); reported is set when it logged it.
	// Wrote notes a successful write. Both may be nil.
	StorageError func(err error) (out error, reported bool)
	Wrote        func()
	// Failpoint is called at the fault tests' points; nil outside them,
	// and then the work that only feeds a failpoint is skipped.
	Failpoint func(name string)
	// Running counts the actor goroutines, for the shard's stop to wait on.
	Running *sync.WaitGroup

	Metrics *Metrics
	Tracer  trace.Tracer
	Logger  *slog.Logger
	Now     func() time.Time
}

// ioTimeout bounds one request's reads from the shard file.
const ioTimeout = 30 * time.Second

// Actor is the single writer of one entity. Its goroutine handles one
// request at a time, in arrival order, so version checks and version
// assignment need no locks. The folded state lives here between requests;
// the shard file is the record it can be rebuilt from.
//
// The goroutine runs only while the actor has requests: it starts with the
// first one queued and ends when the queue is empty. A live actor that is
// idle is only its state, so the node can hold MaxActors of them (100,000)
// without as many goroutine stacks and channel buffers (about 10 KiB each).
//
// Reserve, Unreserve, Busy and Enqueue are safe for concurrent use; the
// rest of the actor is its goroutine's.
type Actor struct {
	sh      *Shard
	id      string
	pending atomic.Int32
	// queue is the mailbox: requests in arrival order, at most MailboxLen.
	// running is set while a goroutine drains it; it and queue are guarded
	// by qmu.
	qmu     sync.Mutex
	queue   []*Request
	running bool

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

// New is the actor of entity id in shard sh. It does no I/O: the entity is
// loaded by its first request.
func New(sh *Shard, id string) *Actor {
	return &Actor{sh: sh, id: id}
}

// ID is the entity's id.
func (a *Actor) ID() string { return a.id }

// Reserve counts a request about to be queued, so that the actor is Busy
// from then on: the shard does it under the lock that passivation takes,
// so an actor is never passivated with a request on its way to it. A
// queued request is uncounted once answered.
func (a *Actor) Reserve() { a.pending.Add(1) }

// Unreserve undoes Reserve for a request that was not queued after all
// (Enqueue refused it).
func (a *Actor) Unreserve() { a.pending.Add(-1) }

// Busy reports whether the actor has requests queued, running or reserved.
func (a *Actor) Busy() bool { return a.pending.Load() > 0 }

// Enqueue adds req to the mailbox and starts the goroutine if none runs. It
// reports false, queueing nothing, when the mailbox is full.
func (a *Actor) Enqueue(req *Request) bool {
	a.qmu.Lock()
	if len(a.queue) >= a.sh.MailboxLen {
		a.qmu.Unlock()
		return false
	}
	a.queue = append(a.queue, req)
	start := !a.running
	if start {
		a.running = true
		// Before the shard's stop waits on Running: a dispatch holds
		// the shard's sendsWG, which the stop waits out first.
		a.sh.Running.Add(1)
	}
	a.qmu.Unlock()
	if start {
		go a.run()
	}
	return true
}

// run handles the queued requests in order and ends once none is left.
func (a *Actor) run() {
	defer a.sh.Running.Done()
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

func (a *Actor) handle(req *Request) {
	ctx, span := a.sh.Tracer.Start(req.Ctx, "kuma.shardnode "+req.Op, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("kuma.entity", a.id), attribute.Int("kuma.shard", a.sh.N)))
	defer span.End()
	ctx, cancel := context.WithTimeout(ctx, ioTimeout)
	defer cancel()
	reply, err := a.serve(ctx, req)
	reported := false
	if a.sh.StorageError != nil {
		err, reported = a.sh.StorageError(err) // the shardnode's corrupt.go
	}
	var body []byte
	if err == nil {
		// Encoded and measured before it is counted: an answer NATS
		// cannot carry is counted and sent as payload_too_large, never
		// counted ok and lost.
		var fits bool
		if body, fits, err = replysize.Encode(reply, a.sh.MaxReply); err == nil && !fits {
			err = a.tooLarge(req.Op, reply, len(body))
		}
	}
	code := "ok"
	if err != nil {
		code = string(kuma.ErrorCode(err))
		span.SetStatus(codes.Error, code)
	}
	m := a.sh.Metrics
	m.Requests.WithLabelValues(req.Op, code).Inc()
	if r, ok := reply.(*kuma.AppendReply); ok && err == nil && !r.Duplicate {
		m.Appended.Add(float64(r.LastVersion - r.FirstVersion + 1))
	}
	if err != nil {
		if kuma.ErrorCode(err) == kuma.CodeInternal && !reported {
			a.sh.Logger.ErrorContext(ctx, "request failed", "context", a.sh.Context, "shard", a.sh.N,
				"entity", a.id, "op", req.Op, "err", err)
		}
		req.Reply(ctx, nil, err)
		return
	}
	req.Reply(ctx, body, nil)
	a.afterAck(reply)
}

// tooLarge is the payload_too_large answer to op when its reply of size
// bytes does not fit in one message: it says what the client can do instead.
func (a *Actor) tooLarge(op string, reply any, size int) *kuma.Error {
	limit := a.sh.MaxReply
	switch r := reply.(type) {
	case *kuma.ReadReply:
		e := replysize.TooLarge(size, limit, fmt.Sprintf("the state of %q at version %d", a.id, r.Version),
			"page its events with history, or read an earlier version with at_version")
		e.Details["version"] = r.Version
		return e
	case *kuma.ExportReply:
		e := replysize.TooLarge(size, limit, fmt.Sprintf("the export of %q", a.id),
			"page its events with history instead, from_version 1 until next_version is null")
		e.Details["version"] = r.Version
		return e
	}
	return replysize.TooLarge(size, limit, fmt.Sprintf("the answer to %s of %q", op, a.id),
		"raise the NATS server's max_payload")
}

// afterAck is the fault tests' after-ack-before-publish point: the reply to
// a new append has been handed to NATS and the relay has not published its
// events yet. The relay's own relay-before-publish point cannot stand in
// for it: the writer wakes the relay before it answers the commit, so the
// relay may reach its publish before the reply is sent.
func (a *Actor) afterAck(reply any) {
	if a.sh.Failpoint == nil {
		return // no fault test: nothing to call, so no position to parse
	}
	r, ok := reply.(*kuma.AppendReply)
	if !ok || r.Duplicate {
		return
	}
	if p, err := kuma.ParsePosition(r.Position); err == nil && a.sh.Published() < p.Seq {
		a.sh.Failpoint("append-after-ack")
	}
}

// failpoint calls the fault tests' point name, if there are fault tests.
func (a *Actor) failpoint(name string) {
	if a.sh.Failpoint != nil {
		a.sh.Failpoint(name)
	}
}

func (a *Actor) serve(ctx context.Context, req *Request) (any, error) {
	// A damaged file answers nothing, not even from memory: requests
	// queued before it was found get the same answer as those after.
	if err := a.sh.Store.Corrupt(); err != nil {
		return nil, err
	}
	if err := a.load(ctx); err != nil {
		return nil, err
	}
	if req.Op == kuma.OpForget {
		var r kuma.ForgetRequest
		if err := kuma.Decode(req.Body, &r); err != nil {
			return nil, err
		}
		by := "unknown"
		if req.RequestedBy != "" {
			by = req.RequestedBy
		}
		return a.forget(ctx, &r, by)
	}
	if a.forgotten != nil {
		return nil, a.forgottenError()
	}
	switch req.Op {
	case kuma.OpAppend:
		var r kuma.AppendRequest
		if err := kuma.Decode(req.Body, &r); err != nil {
			return nil, err
		}
		return a.append(ctx, &r)
	case kuma.OpRead:
		var r kuma.ReadRequest
		if err := kuma.Decode(req.Body, &r); err != nil {
			return nil, err
		}
		return a.read(ctx, &r)
	case kuma.OpHistory:
		var r kuma.HistoryRequest
		if err := kuma.Decode(req.Body, &r); err != nil {
			return nil, err
		}
		return a.history(ctx, &r)
	case kuma.OpExport:
		return a.export(ctx, req.Body)
	}
	return nil, kuma.Errorf(kuma.CodeNotFound, "unknown operation %q", req.Op)
}

// load brings the entity back from its latest snapshot plus the events after
// it. A failed load is retried by the next request.
func (a *Actor) load(ctx context.Context) error {
	if a.loaded {
		return nil
	}
	store := a.sh.Store
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
	key, err := a.sh.Keys.Get(ctx, a.sh.Context, a.id, false)
	if errors.Is(err, kuma.ErrEntityForgotten) {
		// The key was shredded but the rows were not deleted yet (a forget
		// interrupted in this process's life): finish it now.
		fr, err := a.sh.Erase(ctx, sqlite.PendingForget{Entity: a.id, RequestedBy: "recovery", RequestedAt: a.sh.Now().UTC()}, rec.Version)
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
	a.sinceSnapshot = rec.Version % a.sh.SnapshotEvery
	a.loaded = true
	return nil
}

// stateAt folds the entity up to version v from the nearest snapshot and
// returns the state and the time of event v.
func (a *Actor) stateAt(ctx context.Context, v int64) (json.RawMessage, time.Time, error) {
	store := a.sh.Store
	snap, err := store.LatestSnapshot(ctx, a.id, v)
	if err != nil {
		return nil, time.Time{}, err
	}
	var state json.RawMessage
	from, at := int64(1), time.Time{}
	if snap != nil {
		plain, err := a.key.Open(snap.State, envelope.AAD(envelope.PurposeSnapshot, a.sh.Context, a.id, snap.Version))
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
	state, err = a.sh.Reducer.Fold(state, events)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("entity %s: fold stored events: %w", a.id, err)
	}
	return state, stored[len(stored)-1].Time, nil
}
