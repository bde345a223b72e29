package projector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// projectionRT is one projection at run time: the generation that answers
// queries and, during a rebuild, the one being built beside it.
type projectionRT struct {
	svc  *Service
	name string

	rebuilding sync.Mutex // one rebuild request at a time

	mu       sync.Mutex
	live     *generation
	next     *generation // being rebuilt; nil otherwise
	changed  chan struct{}
	nextSpec string // the spec a rebuild builds with
	newModel func(spec string) (model, error)
}

// streamMessage is one delivery of the event stream to a generation.
type streamMessage struct {
	ctx     context.Context // the delivery's: ends with its ack or nack
	seq     uint64          // the stream sequence, if hasSeq
	hasSeq  bool            // false if the delivery's metadata was unreadable
	subject string
	// header has the message's headers (the first value of each), keyed
	// as they came; other keys the feed uses may sit beside them.
	header  map[string]string
	payload []byte
}

// errGiveBack, returned by a feed's handler, hands the message back to be
// delivered again after the nack delay, with nothing logged.
var errGiveBack = errors.New("projector: message handed back")

// subscription is what a feed's subscribe needs.
type subscription struct {
	// consumer makes the subscription's durable consumer (ensureConsumer).
	consumer func(ctx context.Context) (jetstream.Consumer, error)
	topic    string
	// handle applies one message: nil acks it; errGiveBack nacks it
	// quietly; any other error nacks it, after the retries retryable
	// allows, with the nack backoff.
	handle func(*streamMessage) error
	// onError hears the consumer's errors (a deleted durable, missed
	// heartbeats, failed pulls).
	onError func(error)
}

// feed brings a generation its stream messages: one durable consumer at a
// time, one message in flight, in stream order. The Watermill adapter
// (watermill.go) is the one implementation; subscribe, retirer and stop are
// called one at a time.
type feed interface {
	// subscribe starts a new subscription; the one before it, if any,
	// keeps its handler until its retirer is called.
	subscribe(ctx context.Context, s subscription) error
	// retirer returns what stops the current subscription and closes its
	// connection, to be called once a successor runs.
	retirer() func(ctx context.Context) error
	// closeGate waits for the current subscription's delivery in flight
	// and hands every later one back.
	closeGate()
	// gate is the current subscription's gate, nil before the first.
	gate() *gate
	// stop closes the gate and retires the current subscription.
	stop(ctx context.Context) error
}

// generation is one copy of a read model with the feed and durable
// consumer that feed it.
type generation struct {
	p        *projectionRT
	gen      int64
	rm       *readModel
	prefix   string // of its durables' names
	consumer string // the current durable (guarded by mu)
	spec     string

	feed    feed
	resubMu sync.Mutex

	started time.Time
	target  atomic.Uint64 // stream's last sequence when the rebuild began

	mu       sync.Mutex
	done     bool                  // stopped for good
	failure  *kuma.ProjectionError // set while stopped or retrying
	stopped  bool                  // failed on an event; waits for an operator
	retry    bool                  // operator asked to try the failed event again
	skip     string                // operator asked to skip the event at this position
	skipNote skipNote
}

func (p *projectionRT) path(gen int64) string {
	return filepath.Join(p.svc.dir, p.name+"."+strconv.FormatInt(gen, 10)+".db")
}

// open opens a generation's read model and starts feeding it.
func (p *projectionRT) open(ctx context.Context, gen int64, spec string) (*generation, error) {
	m, err := p.newModel(spec)
	if err != nil {
		return nil, err
	}
	rm, err := openReadModel(ctx, p.path(gen), m, spec)
	if err != nil {
		return nil, err
	}
	g := &generation{p: p, gen: gen, rm: rm, spec: spec, started: p.svc.cfg.Now(),
		prefix: consumerPrefix(p.svc.cfg.NodeName, p.svc.cfg.Context, p.name, gen), feed: p.svc.router.newFeed()}
	if err := g.run(ctx); err != nil {
		rm.close()
		return nil, err
	}
	return g, nil
}

// run subscribes the generation: a durable consumer at the read model's
// position, and a subscription of the feed over it.
func (g *generation) run(ctx context.Context) error {
	svc := g.p.svc
	return g.feed.subscribe(ctx, subscription{
		consumer: func(ctx context.Context) (jetstream.Consumer, error) {
			return g.ensureConsumer(ctx, svc.cfg.AckWait+5*time.Second)
		},
		topic:  kuma.EventsWildcard(svc.cfg.Context),
		handle: g.handle,
		// A deleted durable shows as ErrConsumerDeleted, or as missed
		// heartbeats and failed pulls: on any error, look whether it is
		// still there.
		onError: func(err error) { go g.checkConsumer(err) },
	})
}

// checkConsumer resubscribes when the generation's durable is gone.
func (g *generation) checkConsumer(error) {
	// Only the durable's absence counts: a late error of a subscription
	// already replaced must not replace a healthy one.
	if g.consumerGone() {
		g.resubscribe()
	}
}

// consumerGone tells whether the generation's durable no longer exists.
func (g *generation) consumerGone() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := g.p.svc.stream(ctx)
	if err != nil {
		return false
	}
	_, err = s.Consumer(ctx, g.currentConsumer())
	return errors.Is(err, jetstream.ErrConsumerNotFound)
}

func (g *generation) currentConsumer() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.consumer
}

// stalled tells whether the generation's durable waits for an ack that
// will not come, or for a pull that will not come: no delivery has run here
// for stallAfter while the durable counts a message out to this subscriber,
// or has messages and no pull request waiting. The first happens when the
// durable's leader is lost between a delivery and its ack (a node of the
// cluster dies): the message would come again only after the ack wait
// (35 s), and queries with after on this replica would time out until then.
func (g *generation) stalled(stallAfter time.Duration) bool {
	gt := g.feed.gate()
	if gt == nil || gt.idleFor(time.Now()) < stallAfter {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := g.p.svc.stream(ctx)
	if err != nil {
		return false
	}
	c, err := s.Consumer(ctx, g.currentConsumer())
	if err != nil {
		// The stream answers and the durable does not: its one server
		// (consumer.go) is down or cut off, and nothing comes from it
		// until it is back. Idle that long and behind the stream (the
		// caller checked), it is as good as lost.
		return true
	}
	// Either a message is out that no delivery here holds, or messages
	// wait and no pull request of this subscriber is at the durable (lost
	// while the durable had no leader, as when a cluster forms: the pull
	// would be sent again only after missed heartbeats, 30 s).
	info := c.CachedInfo()
	lost := info.NumAckPending > 0 || (info.NumPending > 0 && info.NumWaiting == 0)
	return lost && gt.idleFor(time.Now()) >= stallAfter
}

// resubscribe replaces a subscription whose durable consumer was deleted
// under it (by an operator, or lost with a server), or that stalled (see
// stalled): the new one is created at the read model's position, so
// nothing is missed, and a message applied twice changes nothing.
func (g *generation) resubscribe() { g.replace(false) }

func (g *generation) replace(stall bool) {
	// One at a time; one asked for meanwhile runs after (the consumer it
	// finds may be the one being deleted).
	g.resubMu.Lock()
	defer g.resubMu.Unlock()
	if g.ended() {
		return
	}
	log := g.p.svc.log
	if stall {
		if !g.stalled(g.p.svc.cfg.StallAfter) {
			return
		}
		log.Warn("durable consumer stalled (an ack pending that no delivery here holds, or no pull request, as when its leader was lost); recreating it at the read model's position",
			"consumer", g.currentConsumer())
		g.p.svc.metrics.stalls.Inc()
	} else {
		if !g.consumerGone() {
			return
		}
		log.Warn("durable consumer deleted; recreating it at the read model's position", "consumer", g.currentConsumer())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The new subscription runs before the old one stops (watermill.go,
	// workaround 5). The old one delivers nothing meanwhile (its gate is
	// closed).
	g.feed.closeGate()
	retire := g.feed.retirer()
	if g.p.svc.runCtx.Err() != nil {
		return // the service is stopping
	}
	for {
		err := g.run(ctx)
		if err == nil || errors.Is(err, errStopping) || ctx.Err() != nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	_ = retire(ctx)
}

// stop ends the generation's consumption (the durable stays unless drop).
func (g *generation) stop(ctx context.Context, drop bool) error {
	g.mu.Lock()
	g.done = true
	g.mu.Unlock()
	g.resubMu.Lock() // no resubscription under way or to come
	defer g.resubMu.Unlock()
	err := g.feed.stop(ctx)
	if drop {
		if s, serr := g.p.svc.stream(ctx); serr == nil {
			_ = deleteConsumers(ctx, s, g.prefix)
		}
		return errors.Join(err, g.rm.remove())
	}
	return errors.Join(err, g.rm.close())
}

// handle is the feed's handler: one stream message, applied in one
// transaction with the positions it reaches.
func (g *generation) handle(msg *streamMessage) error {
	svc := g.p.svc
	ctx := telemetry.Extract(msg.ctx, traceHeader(msg.header))
	ctx, span := svc.tracer.Start(ctx, "kuma.projector apply", trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.String("kuma.projection", g.p.name), attribute.Int64("kuma.generation", g.gen)))
	defer span.End()

	b, err := g.decode(ctx, msg)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		return err
	}
	g.mu.Lock()
	if g.stopped && !g.retry && g.skip == "" {
		g.mu.Unlock()
		// Stopped: give the message back (redelivered after the nack
		// delay) without an error, which would be logged each time;
		// status shows why.
		return errGiveBack
	}
	if g.skip != "" {
		b.skip = map[string]skipNote{g.skip: g.skipNote}
	}
	g.mu.Unlock()

	b.span = span.SpanContext()
	// An owner's epoch claim carries nothing to apply; the fault tests'
	// points are about events and notices.
	work := len(b.events) > 0 || b.forget != "" || b.forgetPseudonym != ""
	if work {
		svc.cfg.Failpoint("projector-before-apply")
	}
	start := time.Now()
	err = g.rm.apply(ctx, b, svc.cfg.Now())
	svc.metrics.applySeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		g.fail(err)
		return err
	}
	if work {
		svc.cfg.Failpoint("projector-after-apply")
	}
	span.SetAttributes(attribute.Int("kuma.events", len(b.events)))
	svc.metrics.applied.WithLabelValues(g.p.name).Add(float64(len(b.events)))
	g.mu.Lock()
	if g.failure != nil {
		svc.log.Info("projection moves on", "projection", g.p.name, "generation", g.gen, "after", g.failure.Message)
	}
	g.failure, g.stopped, g.retry, g.skip = nil, false, false, ""
	g.mu.Unlock()
	g.p.applied(g)
	return nil
}

// fail records why a message did not apply: a failed event stops the
// projection there until an operator acts; anything else is retried.
func (g *generation) fail(err error) {
	now := g.p.svc.cfg.Now().UTC()
	g.mu.Lock()
	defer g.mu.Unlock()
	var ae *applyError
	if errors.As(err, &ae) {
		first := !g.stopped || g.failure == nil || g.failure.Position != ae.event.Position
		g.stopped, g.retry, g.skip = true, false, ""
		g.failure = &kuma.ProjectionError{Position: ae.event.Position, EventType: ae.event.Type,
			Entity: ae.event.Entity, Message: ae.err.Error(), Since: now}
		g.skipNote = skipNote{entity: ae.event.Entity, eventType: ae.event.Type, err: ae.err.Error()}
		if first {
			g.p.svc.log.Error("projection stopped at an event; retry or skip it", "projection", g.p.name,
				"generation", g.gen, "position", ae.event.Position, "type", ae.event.Type, "err", ae.err)
		}
		return
	}
	if g.failure == nil || g.failure.Message != err.Error() {
		g.p.svc.log.Warn("projection apply failed; retrying", "projection", g.p.name, "err", err)
		g.failure = &kuma.ProjectionError{Message: err.Error(), Since: now}
	}
}

// decode reads a stream message into a batch, opening every payload. An
// event of a forgotten entity is left out: its key is gone, and its notice
// (or an earlier one) removes whatever the read model held of it.
func (g *generation) decode(ctx context.Context, msg *streamMessage) (*batch, error) {
	svc := g.p.svc
	if !msg.hasSeq {
		return nil, fmt.Errorf("projector: message without a stream sequence")
	}
	seq := msg.seq
	b := &batch{streamSeq: seq}
	if strings.HasSuffix(msg.subject, ".forgotten") {
		var n kuma.ForgottenNotice
		if err := json.Unmarshal(msg.payload, &n); err != nil || (n.Entity == "") == (n.Pseudonym == "") {
			return nil, fmt.Errorf("projector: malformed forget notice at stream sequence %d", seq)
		}
		b.shard = n.Shard
		return b, g.confirmForget(ctx, b, n)
	}
	var sm kuma.StreamMessage
	err := kuma.DecodeStreamMessage(msg.payload, &sm)
	if err != nil {
		err = &rejectError{streamSeq: seq, reason: "its body is not a stream message: " + err.Error()}
	} else {
		err = verifyStreamMessage(svc.cfg.Context, seq, msg, &sm)
	}
	if rj := (*rejectError)(nil); errors.As(err, &rj) {
		// Not the relay's: nothing of it is applied, and the projection
		// stops at it (see readModel.apply).
		b.rejected = rj
		return b, nil
	}
	b.shard = sm.Shard
	b.events = make([]projection.Event, 0, len(sm.Events))
	for _, se := range sm.Events {
		p, err := kuma.ParsePosition(se.Position)
		if err != nil || p.Shard != sm.Shard {
			return nil, fmt.Errorf("projector: bad position %q at stream sequence %d", se.Position, seq)
		}
		b.lastSeq = p.Seq
		op, err := svc.keys.Open(ctx, svc.cfg.Context, se)
		if err != nil {
			return nil, err
		}
		if op.Forgotten {
			continue
		}
		if op.Pseudonym != "" && b.pseudonyms[op.Pseudonym] == "" {
			if b.pseudonyms == nil {
				b.pseudonyms = map[string]string{}
			}
			b.pseudonyms[op.Pseudonym] = op.Entity
		}
		b.events = append(b.events, projection.Event{Entity: op.Entity, Version: se.Version, Time: se.Time,
			Position: se.Position, Type: op.Type, Data: op.Data})
	}
	return b, nil
}

// confirmForget sets the batch's forget only if the keyvault confirms that
// the notice's entity is forgotten: anyone able to publish into the stream
// could write a notice, and a forged one must not drop a live entity. An
// unconfirmed notice is logged, counted, and applied as nothing.
func (g *generation) confirmForget(ctx context.Context, b *batch, n kuma.ForgottenNotice) error {
	svc := g.p.svc
	var rec *kuma.ForgetReply
	var err error
	if n.Pseudonym != "" {
		rec, err = svc.cfg.Keys.ForgottenPseudonym(ctx, svc.cfg.Context, n.Pseudonym)
	} else if kuma.ValidateEntityID(n.Entity) == nil {
		rec, err = svc.cfg.Keys.Forgotten(ctx, svc.cfg.Context, n.Entity) // a notice written before pseudonyms
	}
	if errors.Is(err, kuma.ErrBadRequest) {
		err = nil // a malformed pseudonym names no forgotten entity
	}
	if err != nil {
		return fmt.Errorf("projector: confirm a forget notice with the keyvault: %w", err)
	}
	if rec == nil {
		svc.metrics.ignoredNotices.Inc()
		svc.log.Warn("forget notice ignored: the keyvault says the entity is not forgotten (a forged notice?)",
			"projection", g.p.name, "stream_seq", b.streamSeq)
		return nil
	}
	b.forget, b.forgetPseudonym = n.Entity, n.Pseudonym
	return nil
}

// applied is called after each commit of a generation: it wakes readers
// waiting for a position and, during a rebuild, swaps the new copy in once it
// has caught up with the live one.
func (p *projectionRT) applied(g *generation) {
	p.mu.Lock()
	if g == p.next && g.rm.seq() >= p.live.rm.seq() {
		p.mu.Unlock()
		p.swap(g)
		return
	}
	if g == p.live {
		close(p.changed)
		p.changed = make(chan struct{})
	}
	p.mu.Unlock()
}

// swap makes a caught-up rebuild the live generation. The catalog is
// updated first, so a crash right after still opens the new copy; queries
// running on the old copy finish before its file goes.
func (p *projectionRT) swap(g *generation) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p.mu.Lock()
	if p.next != g {
		p.mu.Unlock()
		return
	}
	if err := p.svc.catalog.setLive(ctx, p.name, g.gen); err != nil {
		p.mu.Unlock()
		p.svc.log.Error("rebuild could not be swapped in; will try again", "projection", p.name, "err", err)
		return
	}
	old := p.live
	p.live, p.next = g, nil
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	p.svc.log.Info("rebuild caught up and swapped in", "projection", p.name, "generation", g.gen,
		"took", p.svc.cfg.Now().Sub(g.started).String())
	// The old generation stops in the background: stopping waits for its
	// delivery in flight, which may be waiting for this projection's lock.
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := old.stop(ctx, true); err != nil {
			p.svc.log.Warn("old generation not fully removed", "projection", p.name, "generation", old.gen, "err", err)
		}
	}()
}

// rebuild starts building a fresh generation from the first event, unless
// one is being built.
func (p *projectionRT) rebuild(ctx context.Context) (*kuma.RebuildReply, error) {
	p.rebuilding.Lock()
	defer p.rebuilding.Unlock()
	p.mu.Lock()
	if p.next != nil {
		gen := p.next.gen
		p.mu.Unlock()
		return &kuma.RebuildReply{Projection: p.name, Generation: gen, Started: false}, nil
	}
	gen := p.live.gen + 1
	spec := p.nextSpec
	p.mu.Unlock()
	next, err := p.start(ctx, gen, spec)
	if err != nil {
		return nil, err
	}
	return &kuma.RebuildReply{Projection: p.name, Generation: next.gen, Started: true}, nil
}

// start opens a new generation for a rebuild, from an empty file.
func (p *projectionRT) start(ctx context.Context, gen int64, spec string) (*generation, error) {
	svc := p.svc
	// A leftover of a rebuild interrupted by a crash is started over.
	if err := removeFiles(p.path(gen)); err != nil {
		return nil, err
	}
	var target uint64
	s, err := svc.stream(ctx)
	if err != nil {
		return nil, err
	}
	// Durables a crashed rebuild left go when the generation subscribes
	// (ensureConsumer).
	if info, err := s.Info(ctx); err == nil {
		target = info.State.LastSeq
	}
	if err := svc.catalog.setBuilding(ctx, p.name, gen); err != nil {
		return nil, err
	}
	g, err := p.open(ctx, gen, spec)
	if err != nil {
		return nil, err
	}
	g.target.Store(target)
	p.mu.Lock()
	p.next = g
	p.mu.Unlock()
	svc.log.Info("rebuild started", "projection", p.name, "generation", gen)
	// An empty stream, or one the live copy has not moved in, never calls
	// applied: check once now; the status ticker checks again.
	p.checkCaughtUp()
	return g, nil
}

// checkCaughtUp swaps a rebuild in when it is as far as the live copy.
func (p *projectionRT) checkCaughtUp() {
	p.mu.Lock()
	next := p.next
	ready := next != nil && next.rm.seq() >= p.live.rm.seq() && next.target.Load() <= next.rm.seq()
	p.mu.Unlock()
	if ready {
		p.swap(next)
	}
}

// wait blocks until the live generation has applied pos, or d passes.
func (p *projectionRT) wait(ctx context.Context, pos kuma.Position, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		p.mu.Lock()
		live, ch := p.live, p.changed
		p.mu.Unlock()
		if live.rm.applied(pos) {
			return nil
		}
		select {
		case <-ch:
		case <-timer.C:
			return kuma.Errorf(kuma.CodeTimeout, "projection %q has not applied %s yet; retry, or wait longer with wait_ms", p.name, pos)
		case <-ctx.Done():
			return kuma.Errorf(kuma.CodeTimeout, "projection %q has not applied %s yet", p.name, pos)
		}
	}
}

// appliedSpan is the span of the live copy's last apply in a shard.
func (p *projectionRT) appliedSpan(shard int) trace.SpanContext {
	p.mu.Lock()
	live := p.live
	p.mu.Unlock()
	return live.rm.spanOf(shard)
}

// query answers from the live generation; if a swap closed the copy under
// it, it asks the new live one.
func (p *projectionRT) query(ctx context.Context, r *kuma.QueryRequest, maxReply int) (*kuma.QueryReply, error) {
	for {
		p.mu.Lock()
		live := p.live
		p.mu.Unlock()
		out, ok, err := live.rm.query(ctx, r, maxReply)
		if ok {
			return out, err
		}
	}
}

// act is an operator's retry or skip of the event a generation stopped at.
// skip must name that event's position, so that the event skipped is the
// one the operator looked at.
func (p *projectionRT) act(op, position string) error {
	p.mu.Lock()
	gens := []*generation{p.live}
	if p.next != nil {
		gens = append(gens, p.next)
	}
	p.mu.Unlock()
	acted := false
	var stoppedAt []string
	for _, g := range gens {
		g.mu.Lock()
		if !g.stopped {
			g.mu.Unlock()
			continue
		}
		at := g.failure.Position
		switch {
		case op == "retry":
			g.retry, acted = true, true
		case position == at:
			g.skip, acted = position, true
		default:
			stoppedAt = append(stoppedAt, at)
		}
		g.mu.Unlock()
		p.svc.log.Info("operator "+op, "projection", p.name, "generation", g.gen, "position", at, "acted", acted)
	}
	switch {
	case acted:
		return nil
	case len(stoppedAt) > 0:
		return kuma.Errorf(kuma.CodeBadRequest, "projection %q is stopped at %s, not %q; skip names the event it stopped at",
			p.name, strings.Join(stoppedAt, " and "), position)
	}
	return kuma.Errorf(kuma.CodeBadRequest, "projection %q is not stopped at an event", p.name)
}

// status reports the live generation and any rebuild.
func (p *projectionRT) status(last uint64) kuma.ProjectionStatus {
	p.mu.Lock()
	live, next := p.live, p.next
	p.mu.Unlock()
	pos, lastPos, seq, skipped := live.rm.snapshot()
	st := kuma.ProjectionStatus{Name: p.name, Node: p.svc.cfg.NodeName, Generation: live.gen,
		Positions: pos, Applied: seq, Skipped: skipped, State: "running"}
	if lastPos.Seq > 0 {
		st.Position = lastPos.String()
	}
	if last > seq {
		st.Lag = int64(last - seq)
	}
	st.State, st.Error = live.health()
	if next != nil {
		_, _, nseq, _ := next.rm.snapshot()
		target := max(next.target.Load(), seq)
		rs := &kuma.RebuildStatus{Generation: next.gen, Applied: nseq, Target: target, StartedAt: next.started, State: "running"}
		if target > 0 {
			rs.Progress = min(1, float64(nseq)/float64(target))
		} else {
			rs.Progress = 1
		}
		rs.State, rs.Error = next.health()
		st.Rebuild = rs
	}
	return st
}

func (g *generation) health() (string, *kuma.ProjectionError) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.stopped:
		f := *g.failure
		return "stopped", &f
	case g.failure != nil:
		f := *g.failure
		return "retrying", &f
	}
	return "running", nil
}

// ended tells whether the generation was stopped for good.
func (g *generation) ended() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.done
}

// closeGate waits for the delivery in flight and lets no other through.
func (g *generation) closeGate() { g.feed.closeGate() }

// traceHeader exposes a message's trace headers to the propagator.
func traceHeader(h map[string]string) nats.Header {
	out := nats.Header{}
	for k, v := range h {
		if strings.EqualFold(k, "traceparent") || strings.EqualFold(k, "tracestate") {
			out[strings.ToLower(k)] = []string{v}
		}
	}
	return out
}
