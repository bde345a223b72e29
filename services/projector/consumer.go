package projector

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmjs "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Metadata keys the projector's unmarshaler sets on every Watermill message.
const (
	metaStreamSeq = "kuma_stream_seq"
	metaSubject   = "kuma_subject"
	metaPending   = "kuma_pending"
)

// unmarshaler turns a JetStream message into a Watermill message that keeps
// what the projector needs: the stream sequence (its resume point), the
// subject (events or forget notice), and the headers, trace context
// included. It never fails: the jetstream subscriber would dereference a nil
// message on error.
type unmarshaler struct{}

func (unmarshaler) Unmarshal(m jetstream.Msg) (*message.Message, error) {
	id := m.Headers().Get(nats.MsgIdHdr)
	wm := message.NewMessage(id, m.Data())
	for k, v := range m.Headers() {
		if len(v) > 0 {
			wm.Metadata.Set(k, v[0])
		}
	}
	wm.Metadata.Set(metaSubject, m.Subject())
	if md, err := m.Metadata(); err == nil {
		wm.Metadata.Set(metaStreamSeq, strconv.FormatUint(md.Sequence.Stream, 10))
		wm.Metadata.Set(metaPending, strconv.FormatUint(md.NumPending, 10))
	}
	if id == "" {
		wm.UUID = wm.Metadata.Get(metaStreamSeq)
	}
	// The message id is the correlation id: one commit group, one id, in
	// every log line about it.
	middleware.SetCorrelationID(wm.UUID, wm)
	return wm, nil
}

// Metadata keys of a projector's durable consumers: the replica (node) and
// the projection it feeds.
const (
	consumerMetaNode       = "kuma_projector_node"
	consumerMetaProjection = "kuma_projection"
)

// consumerPrefix begins the names of a generation's durable consumers: per
// node (each projector keeps its own read models), per projection, per
// generation.
func consumerPrefix(node, kctx, projection string, gen int64) string {
	clean := func(s string) string {
		return strings.Map(func(r rune) rune {
			if r < 128 && (r == '_' || r == '-' || ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z') || ('0' <= r && r <= '9')) {
				return r
			}
			return '_'
		}, s)
	}
	return "kuma_proj_" + clean(node) + "_" + kctx + "_" + projection + "_" + strconv.FormatInt(gen, 10)
}

// ensureConsumer creates the durable consumer of one subscription of the
// generation, at the read model's position: the read model, not a consumer,
// is the source of truth for where to resume. Durables left by earlier
// subscriptions of the generation (an earlier run of the process, or one
// deleted and replaced while running) are deleted first. Each subscription's
// durable has a name of its own, so a pull still pending from a replaced
// subscription can never be served by its successor's consumer.
//
// It runs before the Watermill handler is added, so that the subscriber's
// ResourceInitializer (resources) does no I/O and cannot fail: Watermill's
// router keeps a handler whose subscribe failed and tries it again on every
// later RunHandlers.
func (g *generation) ensureConsumer(ctx context.Context, ackWait time.Duration) (jetstream.Consumer, error) {
	stream, err := g.p.svc.stream(ctx)
	if err != nil {
		return nil, err
	}
	// A consumer has one replica (below), so an earlier one whose server
	// is down cannot be deleted until the server is back: it is left
	// behind, unused (a later subscription of the generation, a rebuild's
	// swap or a drop deletes it), and a new one made beside it. Waiting
	// for the delete would keep the replica stalled as long as the server
	// stays down.
	if err := deleteConsumers(ctx, stream, g.prefix); err != nil {
		if ctx.Err() != nil {
			return nil, err
		}
		g.p.svc.log.Warn("earlier durables of the projection could not all be deleted (their server may be down); making a new one beside them",
			"projection", g.p.name, "generation", g.gen, "err", err)
	}
	applied := g.rm.seq()
	name := g.prefix + "_" + strconv.FormatInt(time.Now().UnixNano(), 36)
	cfg := jetstream.ConsumerConfig{
		Durable:       name,
		Description:   "Kuma projection " + g.p.name + " generation " + strconv.FormatInt(g.gen, 10),
		FilterSubject: kuma.EventsWildcard(g.p.svc.cfg.Context),
		AckPolicy:     jetstream.AckExplicitPolicy,
		// One message at a time: per shard, events apply in commit order.
		MaxAckPending: 1,
		// One replica whatever the stream's: with one message in flight,
		// each ack is a round of the consumer's Raft group before the next
		// delivery, and at three replicas a replica applied a message per
		// round and fell further behind the writes for good. The read
		// model, not the consumer, holds the position, so a consumer lost
		// with its server is only recreated there (watch).
		Replicas:      1,
		AckWait:       ackWait,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		// Names are cleaned and joined with '_', which context and node
		// names may hold too: metadata is how status finds each replica's
		// durables (and so a replica that no longer answers).
		Metadata: map[string]string{consumerMetaNode: g.p.svc.cfg.NodeName, consumerMetaProjection: g.p.name},
	}
	if applied > 0 {
		si, err := stream.Info(ctx)
		if err != nil {
			return nil, err
		}
		if applied <= si.State.LastSeq {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, applied+1
		} else {
			// The stream is younger than the read model (recreated and
			// refilled by the relays): read it all; positions per shard
			// skip what is already applied.
			g.p.svc.log.Warn("the stream is behind the read model; reading it from the start", "consumer", name)
		}
	}
	var c jetstream.Consumer
	err = natsbus.RetryJetStream(ctx, g.p.svc.log, func(ctx context.Context) error {
		c, err = stream.CreateConsumer(ctx, cfg)
		return err
	})
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.consumer = name
	g.mu.Unlock()
	return c, nil
}

// consumerDeleteWait bounds deleteConsumers: a durable whose one server is
// down does not answer its delete until the server is back.
const consumerDeleteWait = 3 * time.Second

// deleteConsumers deletes the durables whose names start with prefix,
// within consumerDeleteWait.
func deleteConsumers(ctx context.Context, stream jetstream.Stream, prefix string) error {
	ctx, cancel := context.WithTimeout(ctx, consumerDeleteWait)
	defer cancel()
	names := stream.ConsumerNames(ctx)
	var old []string
	for n := range names.Name() {
		if strings.HasPrefix(n, prefix+"_") {
			old = append(old, n)
		}
	}
	if err := names.Err(); err != nil {
		return err
	}
	var errs []error
	for _, n := range old {
		if err := stream.DeleteConsumer(ctx, n); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
		}
	}
	return errors.Join(errs...)
}

// resources hands the consumer made by ensureConsumer to the subscriber,
// behind the generation's gate.
func resources(c jetstream.Consumer, gt *gate) wmjs.ResourceInitializer {
	return func(context.Context, jetstream.JetStream, string) (jetstream.Consumer, func(context.Context, watermill.LoggerAdapter), error) {
		return guarded{Consumer: c, g: gt}, nil, nil
	}
}

// guarded wraps a consumer so that stopping a generation is clean. The
// Watermill subscriber closes its output channel when the handler stops, and
// a delivery under way at that moment would send on the closed channel. So a
// delivery holds the gate while it runs, and stop takes the gate (waiting for
// the delivery in flight) and sets stopping before the handler is stopped;
// later deliveries are handed back (nak) for the next subscription.
type guarded struct {
	jetstream.Consumer
	g *gate
}

type gate struct {
	mu       sync.Mutex
	stopping bool
	// busy is set while a delivery runs, last is when one last began or
	// ended (unix ns): with neither for a while and an ack pending on the
	// durable, a delivery or an ack was lost (stalled).
	busy atomic.Bool
	last atomic.Int64
}

func newGate(now time.Time) *gate {
	g := &gate{}
	g.last.Store(now.UnixNano())
	return g
}

// idleFor is how long no delivery has run, zero while one runs.
func (g *gate) idleFor(now time.Time) time.Duration {
	if g.busy.Load() {
		return 0
	}
	return now.Sub(time.Unix(0, g.last.Load()))
}

// close waits for the delivery in flight and lets no other through.
func (g *gate) close() {
	g.mu.Lock()
	g.stopping = true
	g.mu.Unlock()
}

func (c guarded) Consume(h jetstream.MessageHandler, opts ...jetstream.PullConsumeOpt) (jetstream.ConsumeContext, error) {
	return c.Consumer.Consume(func(m jetstream.Msg) {
		c.g.mu.Lock()
		defer c.g.mu.Unlock()
		c.g.busy.Store(true)
		c.g.last.Store(time.Now().UnixNano())
		defer func() {
			c.g.last.Store(time.Now().UnixNano())
			c.g.busy.Store(false)
		}()
		if c.g.stopping {
			// Handed back at once: left unacknowledged, it would hold
			// the durable (one message in flight) for a whole ack wait
			// when a new subscription takes it over.
			_ = m.Nak()
			return
		}
		h(m)
	}, opts...)
}

// errStopped is returned for a message while the projection is stopped at a
// failed event: Watermill nacks it with a delay, nothing moves on.
var errStopped = errors.New("projection stopped at a failed event")

// retryable tells the Retry middleware which failures may pass by
// themselves (the keyvault or the disk was busy); a failed statement will
// fail again, so it stops the projection instead.
func retryable(p middleware.RetryParams) bool {
	var ae *applyError
	return !errors.Is(p.Err, errStopped) && !errors.As(p.Err, &ae)
}

// backoff is the nack delay: short at first, then at most max, so a stopped
// projection notices an operator's retry or skip within max.
type backoff struct{ max time.Duration }

func (b backoff) WaitTime(n uint64) time.Duration {
	d := 50 * time.Millisecond << min(n, 10)
	return min(d, b.max)
}
