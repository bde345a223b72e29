package client

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go/jetstream"
)

// Event is one event delivered by a subscription, opened.
type Event struct {
	Entity   string
	Version  int64
	Type     string
	Data     json.RawMessage
	Time     time.Time
	Position string
	// Forgotten is set, with no Type and Data, for an event of an entity
	// that was forgotten since it was published: its key is gone, so it
	// cannot be opened. A consumer keeping its own copy should drop it.
	Forgotten bool
}

// SubscribeOptions choose what a subscription delivers.
type SubscribeOptions struct {
	// Shard limits the subscription to one shard (nil: all shards).
	Shard *int
	// Entity limits it to one entity; Shards must then be the context's
	// shard count (or the client's DirectShards), to find its shard.
	Entity string
	Shards int
	// After starts after this position (a token from an append reply or an
	// earlier event); empty starts from the first event. Positions order
	// events within a shard only, so After applies to its own shard and the
	// other shards start from the beginning.
	After string
}

// Subscription is a running subscription. Events are delivered to the handler
// one at a time, per shard in commit order (so per entity in version order).
type Subscription struct {
	cc     jetstream.ConsumeContext
	mu     sync.Mutex
	err    error
	done   chan struct{}
	closed bool
}

// Stop ends the subscription.
func (s *Subscription) Stop() { s.finish(nil) }

// Done is closed when the subscription ends: Stop, a handler error or an
// event that could not be opened.
func (s *Subscription) Done() <-chan struct{} { return s.done }

// Err is why the subscription ended (nil after Stop).
func (s *Subscription) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *Subscription) finish(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed, s.err = true, err
	if s.cc != nil {
		s.cc.Stop()
	}
	close(s.done)
}

func (s *Subscription) ended() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Subscribe delivers the context's committed events from its event stream,
// with payloads opened through the keyvault (the connection needs access to
// _kuma.keyvault.key). A handler error ends the subscription; nothing is
// skipped silently.
func (c *Client) Subscribe(ctx context.Context, opts SubscribeOptions, handler func(Event) error) (*Subscription, error) {
	kctx := c.opts.Context
	filter := kuma.PublicPrefix + "." + kctx + ".events.*"
	shards := opts.Shards
	if shards == 0 {
		shards = c.opts.DirectShards
	}
	if opts.Entity != "" {
		if err := kuma.ValidateEntityID(opts.Entity); err != nil {
			return nil, err
		}
		if shards <= 0 {
			return nil, kuma.Errorf(kuma.CodeBadRequest, "subscribing to one entity needs the context's shard count (SubscribeOptions.Shards)")
		}
		s := placement.ShardOf(opts.Entity, shards)
		opts.Shard = &s
	}
	if opts.Shard != nil {
		filter = kuma.EventsSubject(kctx, *opts.Shard)
	}
	var after kuma.Position
	if opts.After != "" {
		p, err := kuma.ParsePosition(opts.After)
		if err != nil {
			return nil, err
		}
		after = p
	}
	js, err := jetstream.New(c.nc)
	if err != nil {
		return nil, err
	}
	cons, err := js.OrderedConsumer(ctx, kuma.StreamName(kctx), jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
		DeliverPolicy:  jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("client: subscribe to %s: %w", kuma.StreamName(kctx), err)
	}
	// A subscription's own bounded cache: a key shredded meanwhile is
	// dropped by the broadcast, or at the latest after the TTL.
	keys := keycache.New(vaultclient.New(c.nc, c.opts.Timeout), 10_000, time.Minute, time.Now, telemetry.Tracer(nil))
	shreds, err := keys.SubscribeShredded(c.nc)
	if err != nil {
		return nil, err
	}
	sub := &Subscription{done: make(chan struct{})}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		if sub.ended() {
			return
		}
		var body kuma.StreamMessage
		if err := kuma.DecodeStreamMessage(m.Data(), &body); err != nil {
			sub.finish(fmt.Errorf("client: malformed stream message on %s: %w", m.Subject(), err))
			return
		}
		for _, se := range body.Events {
			if opts.Entity != "" && se.Entity != opts.Entity {
				continue
			}
			if opts.After != "" && body.Shard == after.Shard {
				if p, err := kuma.ParsePosition(se.Position); err == nil && p.Seq <= after.Seq {
					continue
				}
			}
			op, err := keys.Open(context.Background(), kctx, se)
			if err != nil {
				sub.finish(fmt.Errorf("client: %w", err))
				return
			}
			ev := Event{Entity: se.Entity, Version: se.Version, Time: se.Time, Position: se.Position,
				Type: op.Type, Data: op.Data, Forgotten: op.Forgotten}
			if err := handler(ev); err != nil {
				sub.finish(err)
				return
			}
		}
	})
	if err != nil {
		_ = shreds.Unsubscribe()
		return nil, fmt.Errorf("client: consume: %w", err)
	}
	sub.mu.Lock()
	sub.cc = cc
	if sub.closed { // ended before Consume returned
		cc.Stop()
	}
	sub.mu.Unlock()
	go func() {
		select {
		case <-ctx.Done():
			sub.finish(ctx.Err())
		case <-sub.done:
		}
		_ = shreds.Unsubscribe()
	}()
	return sub, nil
}
