package client

import (
	"context"
	"errors"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"go.opentelemetry.io/otel/attribute"
)

// Feed asks for one page of the context's feed (PROTOCOL.md, feed): the
// events after req.After, opened. A request with WaitMS waits that long for
// new events when there are none; the call's deadline is stretched to
// cover the wait.
func (c *Client) Feed(ctx context.Context, req kuma.FeedRequest) (*kuma.FeedReply, error) {
	if req.WaitMS > 0 {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, c.opts.Timeout+time.Duration(req.WaitMS)*time.Millisecond)
			defer cancel()
		}
	}
	var out kuma.FeedReply
	subject := kuma.FeedSubject(c.opts.Context)
	if err := c.request(ctx, "feed", subject, subject, req, nil, &out, attribute.String("kuma.context", c.opts.Context)); err != nil {
		return nil, err
	}
	return &out, nil
}

// FollowOptions choose what Follow delivers.
type FollowOptions struct {
	// After is the cursor to start after: a Next from an earlier page (a
	// stored checkpoint), kuma.FeedEnd for only what comes from now on, or
	// empty for the first event.
	After string
	// Prefix and Types filter the events (server-side).
	Prefix string
	Types  []string
	// Limit is the page size (default 100).
	Limit int
	// Wait is how long one request waits for new events when there are
	// none (default 10s, at most 30s).
	Wait time.Duration
	// Checkpoint, if set, is called with the cursor after each page once
	// every event of the page was handled: store it, and a later Follow
	// from it misses nothing and repeats at most that page.
	Checkpoint func(next string) error
}

// Follow delivers the context's events to handle, one at a time, each
// entity's in version order and each shard's in commit order, first those
// already stored after opts.After (catch-up) and then new ones as they are
// committed, until ctx ends or handle or Checkpoint returns an error. It
// returns the cursor after the last page handled and why it stopped
// (ctx.Err() when cancelled). Delivery is at least once across restarts:
// deduplicate by (entity, version). Unavailable and timed-out pages (a
// shard moving, a node restarting) are asked again with backoff.
func (c *Client) Follow(ctx context.Context, opts FollowOptions, handle func(kuma.FeedEvent) error) (string, error) {
	wait := opts.Wait
	if wait <= 0 {
		wait = 10 * time.Second
	}
	wait = min(wait, kuma.MaxFeedWait*time.Millisecond)
	cursor := opts.After
	backoff := 20 * time.Millisecond
	for {
		if err := ctx.Err(); err != nil {
			return cursor, err
		}
		page, err := c.Feed(ctx, kuma.FeedRequest{After: cursor, Limit: opts.Limit, WaitMS: int(wait / time.Millisecond), Prefix: opts.Prefix, Types: opts.Types})
		if err != nil {
			if ctx.Err() != nil {
				return cursor, ctx.Err()
			}
			if !errors.Is(err, kuma.ErrUnavailable) && !errors.Is(err, kuma.ErrTimeout) {
				return cursor, err
			}
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return cursor, ctx.Err()
			case <-t.C:
			}
			backoff = min(backoff*2, c.opts.MaxBackoff)
			continue
		}
		backoff = 20 * time.Millisecond
		for _, e := range page.Events {
			if err := handle(e); err != nil {
				return cursor, err
			}
		}
		moved := page.Next != cursor
		cursor = page.Next
		if opts.Checkpoint != nil && moved {
			if err := opts.Checkpoint(cursor); err != nil {
				return cursor, err
			}
		}
	}
}
