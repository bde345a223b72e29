package shardnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// relay is a shard's outbox relay: it publishes the shard's committed events,
// in commit order, to the context's JetStream stream, many events per
// message. The shard file is the system of record; the stream is resumed
// from its own last message for the shard, so a crash between publish and
// bookkeeping neither loses nor repeats anything a consumer can see, and
// JetStream's duplicate window drops a retried publish.
//
// It is given what it needs (relayDeps): the stream, the shard file's
// outbox, the pseudonyms, and a callback that stops the shard once another
// owner has claimed it in the stream.
type relay struct {
	relayDeps
	subject string

	published atomic.Int64 // position the stream is known to hold
	// subjSeq is the stream sequence of the last message on subject. Every
	// publish expects it (JetStream's compare-and-set per subject), so once
	// a new owner has claimed the shard in the stream, a stale owner can
	// publish nothing more: the stream fences it.
	subjSeq atomic.Uint64
	fenced  atomic.Bool
	// epoch is the lease epoch this relay claimed the shard under (0: not
	// claimed, a node outside a cluster). It is in every message's id and
	// headers: JetStream looks a message id up before it checks the
	// expected subject sequence, so an id another owner had used for the
	// same position would be answered as a duplicate, and a stale owner
	// would take that answer for its own publish (and acknowledge appends
	// the stream does not hold).
	epoch atomic.Int64
	// retryLast is the last position of a publish whose outcome is unknown
	// (it timed out): the next attempt sends exactly that batch again, so
	// that if the first one landed, landed recognises it as this relay's
	// own. A bigger batch would end elsewhere and look like another
	// owner's. Only the relay goroutine uses it.
	retryLast int64
	// pubMu guards pubCh, closed and replaced whenever published moves, for
	// appends that are acknowledged only once the stream has their events.
	pubMu   sync.Mutex
	pubCh   chan struct{}
	running atomic.Bool
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// Relay batch limits: one message per event cannot keep up with a durable
// stream; a few hundred KiB per message can.
const (
	relayMaxEvents = 1000
	relayMaxBytes  = 512 << 10
	relayLinger    = 5 * time.Millisecond
	// relayHeaderRoom is kept free of a message's body for its headers
	// (message id, positions, epoch, trace context).
	relayHeaderRoom = 2 << 10
)

// maxBytes is the size a message's body may reach: the relay's own limit,
// or less when the server's max payload is smaller (--max-payload), which
// would refuse a bigger message every time it was retried.
func (r *relay) maxBytes() int {
	limit := relayMaxBytes
	if mp := int(r.maxPayload()) - relayHeaderRoom; mp > 0 && mp < limit {
		limit = mp
	}
	return limit
}

// relayEventBytes bounds an event's share of a message of format: in
// format 1 its payload in base64 and the JSON around it (pseudonym,
// position, time, idempotency key, each of bounded length; a key's byte
// may take six once escaped); in format 2 its raw payload and the header
// of a run it may start.
func relayEventBytes(format int, e sqlite.OutboxEvent) int {
	if format == kuma.StreamFormat2 {
		return kuma.Stream2Size(len(e.Payload), len(e.Idempotency))
	}
	return (len(e.Payload)+2)/3*4 + 6*len(e.Idempotency) + 256
}

// streamFormat is the format this relay writes now.
func (r *relay) streamFormat() int {
	if r.format == nil {
		return kuma.StreamFormat1
	}
	return r.format()
}

func newRelay(d relayDeps) *relay {
	return &relay{relayDeps: d, subject: kuma.EventsSubject(d.kctx, d.n),
		stop: make(chan struct{}), done: make(chan struct{}), pubCh: make(chan struct{})}
}

// resume finds where the stream stands for this shard. The stream, not the
// shard's own note, decides: if the note is behind (a crash after publish),
// nothing is published twice; if the stream is behind (it was purged or
// recreated), the gap is filled.
func (r *relay) resume(ctx context.Context) error {
	noted, err := r.outbox.Published(ctx)
	if err != nil {
		return err
	}
	var inStream int64
	msg, err := r.stream.last(ctx, r.subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return fmt.Errorf("relay: last message of %s: %w", r.subject, err)
	default:
		p, perr := messagePosition(msg.Header)
		if perr != nil {
			return fmt.Errorf("relay: last message of %s: %w", r.subject, perr)
		}
		inStream = p
		r.subjSeq.Store(msg.Sequence)
	}
	if inStream < noted {
		r.logger.Warn("the stream is behind the shard's published position; republishing the gap",
			"subject", r.subject, "stream", inStream, "noted", noted)
	}
	r.setPublished(inStream)
	return nil
}

// setPublished moves the published position and wakes waiting appends.
func (r *relay) setPublished(p int64) {
	r.published.Store(p)
	r.wake()
}

// wake lets every waitPublished look again: the position moved, or the
// relay was fenced and they must be answered now.
func (r *relay) wake() {
	r.pubMu.Lock()
	close(r.pubCh)
	r.pubCh = make(chan struct{})
	r.pubMu.Unlock()
}

// waitPublished returns once the stream holds position seq: the replicated
// durability setting acknowledges an append only then.
func (r *relay) waitPublished(ctx context.Context, seq int64) error {
	for {
		r.pubMu.Lock()
		ch := r.pubCh
		r.pubMu.Unlock()
		if r.published.Load() >= seq {
			return nil
		}
		if r.fenced.Load() {
			return kuma.Errorf(kuma.CodeUnavailable, "shard %d moved to another node before the stream took the events; retry with the same idempotency key", r.n)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return kuma.Errorf(kuma.CodeTimeout, "the events are stored on this node but the stream did not take them in time; retry with the same idempotency key")
		case <-r.gone.Done():
			return kuma.Errorf(kuma.CodeUnavailable, "shard %d is stopping and the stream did not take the events in time; they are stored on this node: retry with the same idempotency key", r.n)
		}
	}
}

// claim publishes the new owner's epoch marker: a message of no events on
// the shard's subject, carrying the position the shard stands at. It is
// published only if the subject's last message is the one the catch-up saw;
// after it, a stale owner's publish fails its compare-and-set.
func (r *relay) claim(ctx context.Context, epoch int64, pos int64) error {
	data, err := json.Marshal(kuma.StreamMessage{Context: r.kctx, Shard: r.n, Events: []kuma.StreamEvent{}})
	if err != nil {
		return err
	}
	msg := nats.NewMsg(r.subject)
	msg.Data = data
	if pos > 0 { // an empty shard has no position yet
		msg.Header.Set(kuma.HeaderLastPosition, kuma.Position{Shard: r.n, Seq: pos}.String())
	}
	msg.Header.Set(kuma.HeaderEpoch, strconv.FormatInt(epoch, 10))
	id := r.kctx + "." + strconv.Itoa(r.n) + ".epoch." + strconv.FormatInt(epoch, 10)
	seq, err := r.stream.publish(ctx, msg, id, r.subjSeq.Load())
	if err != nil {
		return err
	}
	r.subjSeq.Store(seq)
	r.epoch.Store(epoch)
	return nil
}

// start runs the relay; close stops it. running is set before the goroutine
// exists, so a close never skips a relay that is about to run.
func (r *relay) start() {
	r.running.Store(true)
	go r.run()
}

func (r *relay) run() {
	defer close(r.done)
	log := r.logger
	noted := r.published.Load()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		n, err := r.publishOnce()
		if r.fenced.Load() {
			log.Warn("relay stopped: another node claimed the shard in the stream", "subject", r.subject)
			r.lost("fenced by the stream")
			<-r.stop
			return
		}
		if err != nil {
			log.Warn("relay publish failed; retrying", "subject", r.subject, "err", err)
			select {
			case <-r.stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		if n > 0 {
			continue // more may be waiting
		}
		// Caught up: note the position at most once a tick, then sleep until
		// the writer commits again.
		select {
		case <-r.stop:
			r.note(noted)
			return
		case <-r.outbox.Committed():
			// Linger a moment so that one message (one fsync in a durable
			// stream) carries the commits of several groups.
			time.Sleep(relayLinger)
		case <-tick.C:
			noted = r.note(noted)
		}
	}
}

// note records the published position in the shard file if it moved.
func (r *relay) note(noted int64) int64 {
	p := r.published.Load()
	if p == noted {
		return noted
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.outbox.SetPublished(ctx, p); err != nil {
		r.logger.Warn("relay could not note its position", "subject", r.subject, "err", err)
		return noted
	}
	return p
}

// publishOnce publishes the next run of unpublished events as one message and
// returns how many it published.
func (r *relay) publishOnce() (int, error) {
	ctx, cancel := context.WithTimeout(r.gone, 10*time.Second)
	defer cancel()
	from := r.published.Load()
	evs, err := r.outbox.Outbox(ctx, from, relayMaxEvents)
	if err != nil || len(evs) == 0 {
		return 0, err
	}
	if r.retryLast <= from {
		r.retryLast = 0 // published since (resume read the stream)
	}
	// covered: the outbox events this message stands for, up to the size
	// limit, and after an unknown outcome exactly the batch sent before.
	// The format is decided once per message: the gate may change it
	// between two (a retry of an unknown outcome keeps its message id, so
	// JetStream still recognises it whatever its body).
	format := r.streamFormat()
	limit := r.maxBytes()
	n, size := 0, 0
	for _, e := range evs {
		if size > 0 && size+relayEventBytes(format, e) > limit || n > 0 && r.retryLast > 0 && e.Seq > r.retryLast {
			break
		}
		size += relayEventBytes(format, e)
		n++
	}
	covered := evs[:n]
	body, through, err := r.pseudonymous(ctx, covered)
	if err != nil {
		return 0, err
	}
	if len(body.Events) == 0 {
		// Every event is of entities forgotten since: nothing to publish
		// (a forgotten entity's unpublished events never are). If they
		// were sent before with an unknown outcome, that message may have
		// landed: the next publish must expect it.
		if r.retryLast > 0 {
			seq, ok, err := r.landed(ctx, r.retryLast)
			if err != nil {
				return 0, err
			}
			if ok {
				r.subjSeq.Store(seq)
			}
		}
		r.retryLast = 0
		r.setPublished(covered[len(covered)-1].Seq)
		return len(covered), nil
	}
	// The message ends at its last event (its Kuma-Last-Position): events
	// of forgotten entities after it are the next round's, which skips them.
	covered = covered[:through]
	last := covered[len(covered)-1].Seq
	var data []byte
	if format == kuma.StreamFormat2 {
		data, err = kuma.EncodeStreamMessage2(make([]byte, 0, size), &body)
	} else {
		data, err = json.Marshal(body)
	}
	if err != nil {
		return 0, err
	}
	// The publish continues the trace of the first traced request in the
	// message and links the others, and its context travels in the message
	// headers, so the projector's apply joins the trace too.
	var parent trace.SpanContext
	var links []trace.Link
	for _, e := range covered {
		switch {
		case !e.Trace.IsValid():
		case !parent.IsValid():
			parent = e.Trace
		case !e.Trace.Equal(parent) && len(links) < 32:
			links = append(links, trace.Link{SpanContext: e.Trace})
		}
	}
	pctx := ctx
	if parent.IsValid() {
		pctx = trace.ContextWithRemoteSpanContext(ctx, parent)
	}
	pctx, span := r.tracer.Start(pctx, "kuma.relay publish", trace.WithSpanKind(trace.SpanKindProducer), trace.WithLinks(links...),
		trace.WithAttributes(attribute.Int("kuma.shard", r.n), attribute.Int("kuma.relay.events", len(body.Events))))
	defer span.End()
	r.failpoint("relay-before-publish")
	msg := nats.NewMsg(r.subject)
	msg.Data = data
	msg.Header.Set(kuma.HeaderLastPosition, kuma.Position{Shard: r.n, Seq: last}.String())
	if format != kuma.StreamFormat1 {
		msg.Header.Set(kuma.HeaderFormat, strconv.Itoa(format))
	}
	if span.SpanContext().IsValid() {
		telemetry.Inject(pctx, msg.Header)
	}
	id := r.kctx + "." + strconv.Itoa(r.n) + "." + strconv.FormatInt(last, 10)
	if e := r.epoch.Load(); e > 0 {
		id = r.kctx + "." + strconv.Itoa(r.n) + ".e" + strconv.FormatInt(e, 10) + "." + strconv.FormatInt(last, 10)
		msg.Header.Set(kuma.HeaderOwnerEpoch, strconv.FormatInt(e, 10))
	}
	seq, err := r.stream.publish(ctx, msg, id, r.subjSeq.Load())
	switch {
	case isWrongLastSequence(err):
		// Either an earlier attempt of this very message landed and its ack
		// was lost, or another owner has published since.
		seq, ok, cerr := r.landed(ctx, last)
		if cerr == nil && !ok && r.retryLast > last {
			// The batch sent before ended later: its trailing events
			// were of an entity forgotten since, left out this time.
			if seq, ok, cerr = r.landed(ctx, r.retryLast); ok {
				last = r.retryLast
			}
		}
		if cerr != nil {
			return 0, cerr
		}
		if !ok {
			r.fenced.Store(true)
			r.wake() // appends waiting for the stream will never see it take theirs
			return 0, fmt.Errorf("relay: %s has a message of another owner", r.subject)
		}
		r.subjSeq.Store(seq)
	case err != nil:
		r.retryLast = last // it may have landed: send the very same again
		return 0, err
	default:
		r.subjSeq.Store(seq)
	}
	r.retryLast = 0
	r.setPublished(last)
	r.failpoint("relay-after-publish")
	return len(covered), nil
}

// pseudonymous builds the message of evs, each entity named by its
// pseudonym (from the key cache: the append that committed the event has
// just fetched the entity's key, and the pseudonym comes with it), so the
// stream never holds an id. Events of an entity forgotten since they were
// committed are left out: its key is gone, and its rows are about to go.
// through is how many of evs the message stands for: up to its last event.
func (r *relay) pseudonymous(ctx context.Context, evs []sqlite.OutboxEvent) (body kuma.StreamMessage, through int, err error) {
	body = kuma.StreamMessage{Context: r.kctx, Shard: r.n, Events: make([]kuma.StreamEvent, 0, len(evs))}
	var prev string
	var pseudonym string
	forgotten := false
	for i, e := range evs {
		if e.Entity != prev || prev == "" { // events of one entity come in runs
			ent, err := r.keys.Entry(ctx, r.kctx, e.Entity, false)
			switch {
			case errors.Is(err, kuma.ErrEntityForgotten):
				forgotten = true
			case err != nil:
				return kuma.StreamMessage{}, 0, fmt.Errorf("relay: pseudonym of an entity at position %d: %w", e.Seq, err)
			default:
				forgotten, pseudonym = false, ent.Pseudonym
			}
			prev = e.Entity
		}
		if forgotten {
			continue
		}
		body.Events = append(body.Events, kuma.StreamEvent{
			Pseudonym: pseudonym, Version: e.Version, Time: time.Unix(0, e.Time).UTC(), Payload: e.Payload,
			Position:       kuma.Position{Shard: r.n, Seq: e.Seq}.String(),
			IdempotencyKey: e.Idempotency, FirstVersion: e.FirstVersion,
		})
		through = i + 1
	}
	return body, through, nil
}

// landed reports whether the subject's last message is ours, ending at
// position last, and its stream sequence.
func (r *relay) landed(ctx context.Context, last int64) (uint64, bool, error) {
	msg, err := r.stream.last(ctx, r.subject)
	if err != nil {
		return 0, false, err
	}
	p, perr := kuma.ParsePosition(msg.Header.Get(kuma.HeaderLastPosition))
	if perr != nil || msg.Header.Get(kuma.HeaderEpoch) != "" || p.Seq != last {
		return 0, false, nil
	}
	// The same position from another owner is not ours: positions are the
	// shard's, and a new owner reuses those a stale one never published.
	if e := r.epoch.Load(); e > 0 && msg.Header.Get(kuma.HeaderOwnerEpoch) != strconv.FormatInt(e, 10) {
		return 0, false, nil
	}
	return msg.Sequence, true, nil
}

// close stops the relay, then publishes what is left (bounded by ctx) and
// notes the position. The relay goroutine stops first: publishOnce is one
// goroutine's at a time (retryLast, the subject sequence), and two at once
// would race for the same positions, the loser reading the winner's message
// as another owner's and stopping the shard as fenced.
func (r *relay) close(ctx context.Context) {
	r.once.Do(func() {
		close(r.stop)
		<-r.done
		for ctx.Err() == nil && !r.fenced.Load() && r.published.Load() < r.outbox.LastSeq() {
			if n, err := r.publishOnce(); err != nil || n == 0 {
				break
			}
		}
		if !r.fenced.Load() {
			r.note(-1) // -1: whatever was published, write it down
		}
	})
}

// announceForgotten publishes the forget notice of an entity, named by its
// pseudonym, to the stream, after its key is shredded and before its rows
// go: a crash in between leaves the pending mark, and the restart announces
// again.
func (r *relay) announceForgotten(ctx context.Context, pseudonym string, at time.Time) error {
	data, err := json.Marshal(kuma.ForgottenNotice{Context: r.kctx, Shard: r.n, Pseudonym: pseudonym, At: at})
	if err != nil {
		return err
	}
	msg := nats.NewMsg(kuma.ForgottenSubject(r.kctx, r.n))
	msg.Data = data
	id := r.kctx + "." + strconv.Itoa(r.n) + ".forgotten." + pseudonym
	if err := r.stream.announce(ctx, msg, id); err != nil {
		return kuma.Errorf(kuma.CodeUnavailable, "the event stream did not take the forget notice; retry the forget")
	}
	return nil
}
