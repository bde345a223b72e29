package projector

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmjs "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/kumadb/kuma/pkg/kuma"
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

// consumerName is a generation's durable consumer: per node (each projector
// keeps its own read models), per projection, per generation.
func consumerName(node, kctx, projection string, gen int64) string {
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

// resources makes the ResourceInitializer of a generation. The read model,
// not the consumer, is the source of truth for where to resume: an existing
// durable whose acks are not ahead of the read model is kept (what it
// redelivers is recognised and skipped); a missing one, or one ahead of the
// read model (its file was restored, or the durable was recreated with
// other settings), is created anew at the read model's stream sequence.
func (g *generation) resources(ackWait time.Duration) wmjs.ResourceInitializer {
	return func(ctx context.Context, js jetstream.JetStream, _ string) (jetstream.Consumer, func(context.Context, watermill.LoggerAdapter), error) {
		stream, err := js.Stream(ctx, kuma.StreamName(g.p.svc.cfg.Context))
		if err != nil {
			return nil, nil, fmt.Errorf("projector: stream %s: %w", kuma.StreamName(g.p.svc.cfg.Context), err)
		}
		applied := g.rm.seq()
		c, err := stream.Consumer(ctx, g.consumer)
		switch {
		case err == nil:
			info := c.CachedInfo()
			// A message delivered to a previous run and never acked would
			// hold the consumer (one pending at most) until its ack wait
			// ran out; recreating at the read model's position is quicker.
			if info.AckFloor.Stream <= applied && info.NumAckPending == 0 &&
				info.Config.MaxAckPending == 1 && info.Config.AckPolicy == jetstream.AckExplicitPolicy {
				return guarded{Consumer: c, g: &g.gate}, nil, nil
			}
			g.p.svc.log.Warn("recreating a durable consumer at its read model's position",
				"consumer", g.consumer, "acked", info.AckFloor.Stream, "applied", applied)
			if err := stream.DeleteConsumer(ctx, g.consumer); err != nil {
				return nil, nil, err
			}
		case !errors.Is(err, jetstream.ErrConsumerNotFound):
			return nil, nil, err
		}
		cfg := jetstream.ConsumerConfig{
			Durable:       g.consumer,
			Description:   "Kuma projection " + g.p.name + " generation " + strconv.FormatInt(g.gen, 10),
			FilterSubject: kuma.EventsWildcard(g.p.svc.cfg.Context),
			AckPolicy:     jetstream.AckExplicitPolicy,
			// One message at a time: per shard, events apply in commit order.
			MaxAckPending: 1,
			AckWait:       ackWait,
			DeliverPolicy: jetstream.DeliverAllPolicy,
		}
		if applied > 0 {
			si, err := stream.Info(ctx)
			if err != nil {
				return nil, nil, err
			}
			if applied <= si.State.LastSeq {
				cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, applied+1
			} else {
				// The stream is younger than the read model (recreated and
				// refilled by the relays): read it all; positions per shard
				// skip what is already applied.
				g.p.svc.log.Warn("the stream is behind the read model; reading it from the start", "consumer", g.consumer)
			}
		}
		c, err = stream.CreateOrUpdateConsumer(ctx, cfg)
		if err != nil {
			return nil, nil, err
		}
		return guarded{Consumer: c, g: &g.gate}, nil, nil
	}
}

// guarded wraps a consumer so that stopping a generation is clean. The
// Watermill subscriber closes its output channel when the handler stops, and
// a delivery under way at that moment would send on the closed channel. So a
// delivery holds the gate while it runs, and stop takes the gate (waiting for
// the delivery in flight) and sets stopping before the handler is stopped;
// later deliveries are dropped unacknowledged, for the next consumer.
type guarded struct {
	jetstream.Consumer
	g *gate
}

type gate struct {
	mu       sync.Mutex
	stopping bool
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
		if c.g.stopping {
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
