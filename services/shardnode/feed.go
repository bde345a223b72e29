package shardnode

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// The shard's part of the feed (kuma.<ctx>.feed, assembled by the router):
// its events after a position, read from the shard file (the system of
// record, so the feed reaches the first event however little the stream
// keeps), opened with each entity's key, filtered, and cut by count and
// size. It serves only what the relay has published: a client is never shown
// an event that a failover could take back, and the stream's consumers and
// the feed agree on what exists.

// feedScan bounds the rows one request reads, so a selective filter over a
// long history costs a bounded amount per page; the reply's next moves past
// what was read and the client asks again at once.
const feedScan = 10_000

// maxFeedRequests bounds the feed requests a node serves at once (each
// waiting one holds a goroutine); beyond it a request is answered
// unavailable, which the router passes on for the client to retry.
const maxFeedRequests = 4096

// feedFrame is what one event adds to a shard's answer beside its JSON: the
// framing's three varints (at most 30 bytes) and its comma in the page.
const feedFrame = 32

// feedCacheBytes bounds a shard's feed cache (feedcache.go).
const feedCacheBytes = 4 << 20

// feedCatchUp bounds the wait for the relay to publish what was committed
// before a feed request came.
const feedCatchUp = 2 * time.Second

// feedRead is how many rows are read from the file at a time.
const feedRead = 500

// serveFeed answers one shard feed request. It runs on its own goroutine
// (a waiting request must not hold the shard's subscription) and ends when
// the shard stops serving.
func (sh *shard) serveFeed(msg *nats.Msg) {
	defer func() { <-sh.feedSlots }()
	var r kuma.ShardFeedRequest
	if err := kuma.Decode(msg.Data, &r); err != nil {
		sh.replyFeed(msg, nil, err)
		return
	}
	if r.Limit < 1 || r.Limit > kuma.MaxFeedLimit || r.MaxBytes < 1 || r.After < 0 || r.WaitMS < 0 || r.WaitMS > kuma.MaxFeedWait {
		sh.replyFeed(msg, nil, kuma.Errorf(kuma.CodeBadRequest, "shard feed request out of range"))
		return
	}
	ctx, cancel := context.WithTimeout(sh.checkCtx, time.Duration(r.WaitMS)*time.Millisecond+10*time.Second)
	defer cancel()
	out, err := sh.feedPage(ctx, &r)
	sh.replyFeed(msg, out, err)
}

func (sh *shard) replyFeed(msg *nats.Msg, out *kuma.ShardFeedPage, err error) {
	code := "ok"
	if err != nil {
		if sh.checkCtx.Err() != nil {
			err = kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q is stopping; retry", sh.n, sh.cc.Name)
		}
		code = string(kuma.ErrorCode(err))
		err = natsbus.RespondError(sh.nc, msg, err)
	} else if msg.Reply != "" {
		b, _ := out.MarshalBinary()
		err = sh.nc.Publish(msg.Reply, b)
	}
	sh.metrics.requests.WithLabelValues("feed", code).Inc()
	if err != nil {
		sh.logger.Warn("feed reply failed", "shard", sh.n, "err", err)
	}
}

// feedPage reads the page; with nothing after r.After it waits up to
// r.WaitMS for the relay to publish more.
func (sh *shard) feedPage(ctx context.Context, r *kuma.ShardFeedRequest) (*kuma.ShardFeedPage, error) {
	if r.End {
		return &kuma.ShardFeedPage{Next: sh.relay.published.Load()}, nil
	}
	deadline := time.Now().Add(time.Duration(r.WaitMS) * time.Millisecond)
	// What was committed before the request is shown in it: the relay
	// publishes within milliseconds, so wait for it (bounded) rather than
	// answer without a write the client has just had acknowledged.
	if committed := sh.store.LastSeq(); sh.relay.published.Load() < committed {
		wctx, cancel := context.WithTimeout(ctx, feedCatchUp)
		_ = sh.relay.waitPublished(wctx, committed) // late or fenced: serve what is published
		cancel()
	}
	for {
		out, err := sh.feedRead(ctx, r)
		if err != nil || len(out.Events) > 0 || r.WaitMS == 0 {
			return out, err
		}
		// Nothing to show: what was read (if anything) was filtered out.
		// Wait past it, so a filtered follower waits rather than spins.
		r.After = out.Next
		left := time.Until(deadline)
		if left <= 0 {
			return out, nil
		}
		wctx, cancel := context.WithTimeout(ctx, left)
		err = sh.relay.waitPublished(wctx, r.After+1)
		cancel()
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case sh.relay.fenced.Load():
			return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q moved to another node; retry", sh.n, sh.cc.Name)
		case err != nil:
			return out, nil // waited the whole time: an empty page
		}
	}
}

// feedRead reads once, without waiting: from the feed cache when the
// cursor is inside its run, else from the file (filling the cache).
func (sh *shard) feedRead(ctx context.Context, r *kuma.ShardFeedRequest) (*kuma.ShardFeedPage, error) {
	out := &kuma.ShardFeedPage{Next: r.After}
	upTo := sh.relay.published.Load()
	budget := r.MaxBytes
	for scanned := 0; out.Next < upTo && scanned < feedScan; {
		entries, to, ok := sh.feedCache.after(out.Next)
		if !ok {
			var err error
			if entries, to, err = sh.feedFromFile(ctx, out.Next, r.Prefix); err != nil {
				return nil, err
			}
			if to == out.Next {
				out.Next = upTo // nothing stored up to upTo: the rest were forgotten
				break
			}
		}
		for _, e := range entries {
			if e.seq > upTo {
				return out, nil
			}
			scanned++
			if (r.Prefix != "" && !strings.HasPrefix(e.entity, r.Prefix)) || (len(r.Types) > 0 && !slices.Contains(r.Types, e.typ)) {
				out.Next = e.seq
				continue
			}
			if len(e.json)+feedFrame > budget {
				if len(out.Events) == 0 {
					return nil, kuma.Errorf(kuma.CodePayloadTooLarge,
						"event %s of %s is %d bytes, over the feed's page size; read it with history",
						kuma.Position{Shard: sh.n, Seq: e.seq}, e.entity, len(e.json))
				}
				return out, nil
			}
			// Its framing to the router (three varints) is counted too, so
			// the shard's answer also fits the max payload.
			budget -= len(e.json) + feedFrame
			out.Events = append(out.Events, kuma.ShardFeedEvent{Time: e.time, Seq: e.seq, JSON: e.json})
			out.Next = e.seq
			if len(out.Events) == r.Limit {
				return out, nil
			}
		}
		// Nothing else is stored in the run read: move to its end.
		out.Next = max(out.Next, min(to, upTo))
	}
	return out, nil
}

// feedFromFile reads the events after position after from the shard file,
// opened and encoded, and returns them with the position the read covers up
// to (after itself when nothing is stored past it). Without a prefix every
// event is encoded and the run goes into the feed cache; with one, only the
// matching events are opened, and nothing is cached.
func (sh *shard) feedFromFile(ctx context.Context, after int64, prefix string) ([]feedEntry, int64, error) {
	gen := sh.feedCache.generation()
	rows, err := sh.store.FeedAfter(ctx, after, feedRead)
	if err != nil || len(rows) == 0 {
		return nil, after, err
	}
	entries := make([]feedEntry, 0, len(rows))
	var buf []byte // the events' JSON back to back; slices of it stay valid as it grows
	for _, row := range rows {
		if prefix != "" && !strings.HasPrefix(row.Entity, prefix) {
			continue
		}
		ev, ok, err := sh.openFeedEvent(ctx, row.Entity, row.Version, row.Seq, row.Payload, row.Time)
		if err != nil {
			return nil, after, err
		}
		if !ok {
			continue // forgotten: never shown
		}
		start := len(buf)
		buf = kuma.AppendFeedEventJSON(buf, &ev)
		entries = append(entries, feedEntry{seq: row.Seq, time: row.Time, entity: row.Entity, typ: ev.Type, json: buf[start:len(buf):len(buf)]})
	}
	to := rows[len(rows)-1].Seq
	if prefix == "" {
		sh.feedCache.insert(gen, after, to, entries)
	}
	return entries, to, nil
}

// openFeedEvent opens one stored event. ok is false for an entity whose key
// is gone (forgotten, its rows not yet deleted): it never appears.
func (sh *shard) openFeedEvent(ctx context.Context, entity string, version, seq int64, payload []byte, nanos int64) (kuma.FeedEvent, bool, error) {
	key, err := sh.keys.Get(ctx, sh.cc.Name, entity, false)
	switch {
	case errors.Is(err, kuma.ErrEntityForgotten):
		return kuma.FeedEvent{}, false, nil
	case errors.Is(err, kuma.ErrNotFound):
		// Rows with no key: nothing can open them, and holding the
		// shard's feed on them would stop every follower.
		sh.logger.Warn("feed: an event whose entity has no key, skipped", "shard", sh.n, "position", seq)
		return kuma.FeedEvent{}, false, nil
	case err != nil:
		return kuma.FeedEvent{}, false, fmt.Errorf("key of %s: %w", entity, err)
	}
	plain, err := key.Open(payload, envelope.AAD(envelope.PurposeEvent, sh.cc.Name, entity, version))
	if err != nil {
		sh.logger.Error("sealed data does not open: tampered, misplaced or wrong key", "shard", sh.n, "position", seq)
		return kuma.FeedEvent{}, false, kuma.Errorf(kuma.CodeInternal, "an event of shard %d does not open", sh.n)
	}
	typ, data, err := envelope.DecodeEvent(plain)
	if err != nil {
		return kuma.FeedEvent{}, false, kuma.Errorf(kuma.CodeInternal, "an event of shard %d is malformed", sh.n)
	}
	return kuma.FeedEvent{
		Entity: entity, Version: version, Type: typ, Data: data,
		Time:     time.Unix(0, nanos).UTC(),
		Position: kuma.Position{Shard: sh.n, Seq: seq}.String(),
	}, true, nil
}
