package client

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
)

// Event is one event delivered by a subscription, opened.
type Event struct {
	Entity   string
	Version  int64
	Type     string
	Data     json.RawMessage
	Time     time.Time
	Position string
}

// SubscribeOptions choose what a subscription delivers.
type SubscribeOptions struct {
	// Shard limits the subscription to one shard (nil: all shards).
	Shard *int
	// Entity limits it to one entity.
	Entity string
	// Shards is no longer needed (the feed knows the context's shard
	// count); it is accepted and ignored.
	Shards int
	// After starts after this position (a token from an append reply or an
	// earlier event); empty starts from the first event. Positions order
	// events within a shard only, so After applies to its own shard and the
	// other shards start from the beginning. To resume a subscription of
	// every shard, keep Follow's cursor instead.
	After string
}

// Subscription is a running subscription. Events are delivered to the handler
// one at a time, per shard in commit order (so per entity in version order).
type Subscription struct {
	cancel context.CancelFunc
	mu     sync.Mutex
	err    error
	done   chan struct{}
	closed bool
}

// Stop ends the subscription.
func (s *Subscription) Stop() { s.finish(nil) }

// Done is closed when the subscription ends: Stop, a handler error, its
// context ending, or a request the feed refused.
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
	s.cancel()
	close(s.done)
}

// Subscribe delivers the context's committed events, opened, from the feed
// (kuma.<ctx>.feed, Follow): first those already stored after opts.After,
// then new ones as they are committed. It reads from the position it is
// given, never the whole history before it, and needs no right but the
// feed's (no keyvault, no stream). A forgotten entity's events never come.
// A handler error ends the subscription; nothing is skipped silently.
func (c *Client) Subscribe(ctx context.Context, opts SubscribeOptions, handler func(Event) error) (*Subscription, error) {
	if opts.Entity != "" {
		if err := kuma.ValidateEntityID(opts.Entity); err != nil {
			return nil, err
		}
	}
	cursor := ""
	if opts.After != "" {
		p, err := kuma.ParsePosition(opts.After)
		if err != nil {
			return nil, err
		}
		// The cursor's other shards start from the beginning: the feed's
		// own cursor tells the shard count.
		end, err := c.Feed(ctx, kuma.FeedRequest{After: kuma.FeedEnd})
		if err != nil {
			return nil, err
		}
		cur, err := kuma.ParseFeedCursor(end.Next, c.opts.Context)
		if err != nil {
			return nil, err
		}
		if p.Shard >= len(cur.After) {
			return nil, kuma.Errorf(kuma.CodeBadRequest, "position %s names shard %d; the context has %d", opts.After, p.Shard, len(cur.After))
		}
		clear(cur.After)
		cur.After[p.Shard] = p.Seq
		cursor = cur.String()
	}
	ctx, cancel := context.WithCancel(ctx)
	sub := &Subscription{cancel: cancel, done: make(chan struct{})}
	go func() {
		_, err := c.Follow(ctx, FollowOptions{After: cursor, Prefix: opts.Entity}, func(e kuma.FeedEvent) error {
			if opts.Entity != "" && e.Entity != opts.Entity {
				return nil
			}
			if opts.Shard != nil {
				if p, err := kuma.ParsePosition(e.Position); err != nil || p.Shard != *opts.Shard {
					return nil
				}
			}
			return handler(Event{Entity: e.Entity, Version: e.Version, Type: e.Type, Data: e.Data, Time: e.Time, Position: e.Position})
		})
		if errors.Is(err, context.Canceled) && ctx.Err() != nil {
			sub.mu.Lock()
			stopped := sub.closed
			sub.mu.Unlock()
			if stopped {
				return // Stop
			}
		}
		sub.finish(err)
	}()
	return sub, nil
}
