package projector

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go/jetstream"
)

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

	// rehomeAt is when the watch may next move a durable placed on
	// another server home (away), rehomeEvery the wait after that, which
	// doubles while the moves miss (watch only).
	rehomeAt    time.Time
	rehomeEvery time.Duration

	mu       sync.Mutex
	done     bool                  // stopped for good
	failure  *kuma.ProjectionError // set while stopped or retrying
	stopped  bool                  // failed on an event; waits for an operator
	retry    bool                  // operator asked to try the failed event again
	skip     string                // operator asked to skip the event at this position
	skipNote skipNote
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
func (g *generation) resubscribe() { g.replace(replaceGone) }

// replaceReason is why a subscription is replaced: its durable is gone,
// stalled, or lives on another server than the projector's (away).
type replaceReason int

const (
	replaceGone replaceReason = iota
	replaceStalled
	replaceAway
)

// away tells whether the generation's durable lives on another server than
// the projector's own while that server holds a current replica of the
// stream, so that the durable could live there (consumer.go).
func (g *generation) away() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := g.p.svc.stream(ctx)
	if err != nil {
		return false
	}
	home := g.p.svc.nc.ConnectedServerName()
	if !streamPeer(s.CachedInfo(), home, true) {
		return false
	}
	c, err := s.Consumer(ctx, g.currentConsumer())
	if err != nil {
		return false
	}
	at := consumerServer(c.CachedInfo())
	return at != "" && at != home
}

func (g *generation) replace(why replaceReason) {
	// One at a time; one asked for meanwhile runs after (the consumer it
	// finds may be the one being deleted).
	g.resubMu.Lock()
	defer g.resubMu.Unlock()
	if g.ended() {
		return
	}
	log := g.p.svc.log
	switch why {
	case replaceStalled:
		if !g.stalled(g.p.svc.cfg.StallAfter) {
			return
		}
		log.Warn("durable consumer stalled (an ack pending that no delivery here holds, or no pull request, as when its leader was lost); recreating it at the read model's position",
			"consumer", g.currentConsumer())
		g.p.svc.metrics.stalls.Inc()
	case replaceAway:
		if !g.away() {
			return
		}
		log.Info("durable consumer lives on another server than this projector's; recreating it here at the read model's position",
			"consumer", g.currentConsumer())
	default:
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
