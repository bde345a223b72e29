package projector

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go/jetstream"
)

// Metadata keys of a projector's durable consumers: the replica (node),
// the projection it feeds, and the stream formats it reads (the relays
// write format 2 only while every durable reads it).
const (
	consumerMetaNode       = kuma.ConsumerMetaNode
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
// It runs before the subscription starts, so that nothing in the
// subscription itself does I/O that can fail (watermill.go, workaround 2).
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
	cfg := jetstream.ConsumerConfig{
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
		Metadata: map[string]string{consumerMetaNode: g.p.svc.cfg.NodeName, consumerMetaProjection: g.p.name,
			kuma.ConsumerMetaStreamFormats: kuma.FormatList(kuma.StreamFormats)},
	}
	si, err := stream.Info(ctx)
	if err != nil {
		return nil, err
	}
	if applied > 0 {
		if applied <= si.State.LastSeq {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, applied+1
		} else {
			// The stream is younger than the read model (recreated and
			// refilled by the relays): read it all; positions per shard
			// skip what is already applied.
			g.p.svc.log.Warn("the stream is behind the read model; reading it from the start", "projection", g.p.name, "generation", g.gen)
		}
	}
	home := g.p.svc.nc.ConnectedServerName()
	var c jetstream.Consumer
	for try := 1; ; try++ {
		cfg.Durable = g.prefix + "_" + strconv.FormatInt(time.Now().UnixNano(), 36)
		err = natsbus.RetryJetStream(ctx, g.p.svc.log, func(ctx context.Context) error {
			c, err = stream.CreateConsumer(ctx, cfg)
			return err
		})
		if err != nil {
			return nil, err
		}
		at := consumerServer(c.CachedInfo())
		if at == home || try == colocateAttempts || !streamPeer(si, home, false) {
			break
		}
		// Placed on another server: made again, so that the replica's
		// deliveries and acks stay on its own server and the death of
		// another node does not take its durable.
		if err := stream.DeleteConsumer(ctx, cfg.Durable); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			break // keep the one there is
		}
	}
	g.mu.Lock()
	g.consumer = cfg.Durable
	g.mu.Unlock()
	return c, nil
}

// colocateAttempts bounds the tries at placing a durable on the projector's
// own server. The server places a one-replica consumer on a random caught-up
// peer of the stream: at three peers, eight tries miss 4 % of the time, and
// a durable elsewhere still works, one route away.
const colocateAttempts = 8

// consumerServer is the server a one-replica durable lives on ("" when the
// server does not say, as a server outside a cluster does not).
func consumerServer(info *jetstream.ConsumerInfo) string {
	if info == nil || info.Cluster == nil {
		return ""
	}
	return info.Cluster.Leader
}

// streamPeer tells whether server holds a replica of the stream (and, with
// current, one that is caught up with the leader's): the only servers a
// durable of it can be placed on.
func streamPeer(si *jetstream.StreamInfo, server string, current bool) bool {
	if si == nil || si.Cluster == nil || server == "" {
		return false
	}
	if si.Cluster.Leader == server {
		return true
	}
	for _, r := range si.Cluster.Replicas {
		if r != nil && r.Name == server {
			return !current || (r.Current && !r.Offline)
		}
	}
	return false
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

// errStopped is returned for a message while the projection is stopped at a
// failed event: Watermill nacks it with a delay, nothing moves on.
var errStopped = errors.New("projection stopped at a failed event")

// retryable tells the Retry middleware which failures may pass by
// themselves (the keyvault or the disk was busy); a failed statement will
// fail again, so it stops the projection instead.
func retryable(err error) bool {
	var ae *applyError
	return !errors.Is(err, errStopped) && !errors.As(err, &ae)
}
