package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// The feed (kuma.<ctx>.feed, PROTOCOL.md): the router assembles a page from
// the shards' parts. It asks every shard's owner for its events after the
// cursor's position for that shard (each owner reads its own file, so no
// process reads everything), merges them by commit time and cuts the page by
// count and size; a shard's position in the next cursor moves only past
// what the page holds (or the filters skipped), so nothing is lost when a
// page is cut. With nothing new it asks again with wait_ms, and the first
// shard that has something answers the page. A shard whose owner is down
// keeps its position: the page comes from the others, and the client
// catches up on that shard once it is served again.

// maxFeedWaiting bounds the feed requests one router serves at once.
const maxFeedWaiting = 4096

// feedAsk bounds a shard's answer beyond the wait it was given.
const feedAsk = 5 * time.Second

// feedReplyEnvelope is a page's JSON around its events and cursor.
const feedReplyEnvelope = len(`{"events":[],"next":""}`)

// feedShareSlack is asked of each shard beyond its share of the page.
const feedShareSlack = 8

func (s *Service) feedHandler(kctx string) micro.HandlerFunc {
	// The service drops a request whose reply lies in a reserved
	// namespace before this runs (natsbus.Service).
	return func(req micro.Request) {
		if req.Reply() == "" {
			return // a publish: nobody would read the page
		}
		select {
		case s.feedSlots <- struct{}{}:
		default:
			s.fail(req, kuma.Errorf(kuma.CodeUnavailable, "router serves %d feed requests already; retry", maxFeedWaiting))
			return
		}
		s.feeds.Add(1)
		go func() {
			defer s.feeds.Done()
			defer func() { <-s.feedSlots }()
			out, err := s.feed(s.feedCtx, kctx, req.Data())
			if err != nil {
				s.fail(req, err)
				return
			}
			if err := req.Respond(out); err != nil {
				s.cfg.Logger.Warn("router feed reply failed", "err", err)
			}
		}()
	}
}

// shardPart is one shard's answer.
type shardPart struct {
	shard int
	reply *kuma.ShardFeedPage
	err   error
}

// feed answers one feed request with the page's JSON.
//
// Followers at the same place ask the same question: requests alike in
// every field that are in flight at once are answered by one page, asked
// of the shards once (singleflight). Followers of the live tail ask at
// the same cursor as each page ends, so they keep sharing, and the shards
// and the router do the work of one follower for all of them; each still
// gets its own copy of the page.
func (s *Service) feed(ctx context.Context, kctx string, body []byte) ([]byte, error) {
	var r kuma.FeedRequest
	if err := kuma.Decode(body, &r); err != nil {
		return nil, err
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	// Types in their order: a page is the same for any order, but the
	// key need not know that.
	key := kctx + "\x00" + r.After + "\x00" + strconv.Itoa(r.Limit) + "\x00" + strconv.Itoa(r.WaitMS) + "\x00" + r.Prefix + "\x00" + strings.Join(r.Types, "\x00")
	out, err, shared := s.feedFlight.Do(key, func() (any, error) { return s.page(ctx, kctx, r) })
	if err != nil {
		return nil, err
	}
	s.feedPages.Add(1)
	if shared {
		s.feedShared.Add(1)
	}
	return out.([]byte), nil
}

// page answers one validated feed request.
func (s *Service) page(ctx context.Context, kctx string, r kuma.FeedRequest) ([]byte, error) {
	shards, _, err := s.counts.of(ctx, kctx)
	if err != nil {
		return nil, err
	}
	// The reply limit every answer keeps (natsbus.ReplyLimit), less the
	// page's envelope and its cursor at its longest (10 bytes a position):
	// a fixed allowance ran short for contexts of thousands of shards.
	longest := kuma.FeedCursor{Context: kctx, After: make([]int64, shards)}
	for i := range longest.After {
		longest.After[i] = 1<<62 - 1
	}
	budget := natsbus.ReplyLimit(s.nc) - feedReplyEnvelope - len(longest.String())
	// Each shard is asked for its share of the page (and a little more, so
	// that a page is full when some shards have less); a shard with more
	// gives the rest to the next page. Asking each for the whole limit made
	// the router decode up to shards × limit events to keep limit.
	ask := kuma.ShardFeedRequest{Limit: min(r.Limit, (r.Limit+shards-1)/shards+feedShareSlack), MaxBytes: budget, Prefix: r.Prefix, Types: r.Types}

	var cur kuma.FeedCursor
	if r.After == kuma.FeedEnd {
		end := ask
		end.End = true
		parts := s.askShards(ctx, kctx, allShards(shards), nil, end, false)
		cur = kuma.FeedCursor{Context: kctx, After: make([]int64, shards)}
		for _, p := range parts {
			if p.err != nil {
				return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d has no owner answering, so the end of the feed is not known; retry", p.shard)
			}
			cur.After[p.shard] = p.reply.Next
		}
	} else {
		var err error
		if cur, err = kuma.DecodeFeedCursor(r.After, kctx, shards); err != nil {
			return nil, err
		}
	}

	parts := s.askShards(ctx, kctx, allShards(shards), cur.After, ask, false)
	page, next, err := mergeFeed(parts, cur, r.Limit, budget)
	if err != nil || len(page) > 0 || r.WaitMS == 0 {
		return feedReply(page, next), err
	}
	// Nothing new: wait on every shard, and answer with the first that has
	// something (the others' answers are dropped; they changed nothing).
	ask.WaitMS = r.WaitMS
	parts = s.askShards(ctx, kctx, allShards(shards), next.After, ask, true)
	page, next, err = mergeFeed(parts, next, r.Limit, budget)
	return feedReply(page, next), err
}

// feedReply writes the page: the events' JSON as the shards encoded it,
// spliced, and the cursor.
func feedReply(page []kuma.ShardFeedEvent, next kuma.FeedCursor) []byte {
	n := 64
	for _, e := range page {
		n += len(e.JSON) + 1
	}
	b := make([]byte, 0, n)
	b = append(b, `{"events":[`...)
	for i, e := range page {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, e.JSON...)
	}
	b = append(b, `],"next":"`...)
	b = append(b, next.String()...)
	return append(b, `"}`...)
}

func allShards(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// askShards sends ask to each shard (with its own position from after) at
// once and collects the answers. With first set it returns as soon as one
// answer holds events (or every shard has answered).
func (s *Service) askShards(ctx context.Context, kctx string, shards []int, after []int64, ask kuma.ShardFeedRequest, first bool) []shardPart {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(ask.WaitMS)*time.Millisecond+feedAsk)
	defer cancel()
	ch := make(chan shardPart, len(shards))
	// The goroutines of answers not waited for end with ctx (cancelled on
	// return); ch is buffered for all of them.
	for _, n := range shards {
		q := ask
		if after != nil {
			q.After = after[n]
		}
		go func() {
			rep, err := s.askShard(ctx, kctx, n, &q)
			ch <- shardPart{shard: n, reply: rep, err: err}
		}()
	}
	var out []shardPart
	for range shards {
		p := <-ch
		out = append(out, p)
		if first && p.err == nil && len(p.reply.Events) > 0 {
			break
		}
	}
	cancel()
	return out
}

func (s *Service) askShard(ctx context.Context, kctx string, n int, q *kuma.ShardFeedRequest) (*kuma.ShardFeedPage, error) {
	body, err := json.Marshal(q)
	if err != nil {
		return nil, err
	}
	msg, err := s.nc.RequestWithContext(ctx, kuma.ShardFeedSubject(kctx, n), body)
	switch {
	case natsbus.IsNoResponders(err):
		return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d has no owner answering", n)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
		return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d did not answer in time", n)
	case err != nil:
		return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d: %v", n, err)
	}
	if err := natsbus.ReplyError(msg); err != nil {
		return nil, err
	}
	var rep kuma.ShardFeedPage
	if err := rep.UnmarshalBinary(msg.Data); err != nil {
		return nil, fmt.Errorf("shard %d answered a malformed feed page: %w", n, err)
	}
	return &rep, nil
}

// mergeFeed builds the page from the shards' parts, oldest commit first,
// each shard's events in its order, within limit events and budget bytes.
// A shard's position in next moves past the events the page holds, or to
// its answer's next when the page holds all of them. A shard that could
// not answer keeps its position; when none could, the page is an error. An
// error other than unavailable from any shard (an event too large for a
// page, a damaged file) is the answer: a client must not skip past it.
func mergeFeed(parts []shardPart, cur kuma.FeedCursor, limit, budget int) ([]kuma.ShardFeedEvent, kuma.FeedCursor, error) {
	next := kuma.FeedCursor{Context: cur.Context, After: append([]int64(nil), cur.After...)}
	var answered int
	var down error
	heads := map[int][]kuma.ShardFeedEvent{}
	for _, p := range parts {
		if p.err != nil {
			if kuma.ErrorCode(p.err) != kuma.CodeUnavailable {
				return nil, cur, p.err
			}
			down = p.err
			continue
		}
		answered++
		heads[p.shard] = p.reply.Events
	}
	if answered == 0 && down != nil {
		return nil, cur, down
	}
	var page []kuma.ShardFeedEvent
	for len(page) < limit {
		best := -1
		for sh, evs := range heads {
			if len(evs) == 0 {
				continue
			}
			if best < 0 || evs[0].Time < heads[best][0].Time || (evs[0].Time == heads[best][0].Time && sh < best) {
				best = sh
			}
		}
		if best < 0 {
			break
		}
		e := heads[best][0]
		if len(e.JSON)+1 > budget {
			break
		}
		budget -= len(e.JSON) + 1
		page = append(page, e)
		heads[best] = heads[best][1:]
		next.After[best] = e.Seq
	}
	// A shard whose whole part is in the page moves to its answer's next
	// (past what its filters skipped after its last event).
	for _, p := range parts {
		if p.err == nil && len(heads[p.shard]) == 0 && p.reply.Next > next.After[p.shard] {
			next.After[p.shard] = p.reply.Next
		}
	}
	return page, next, nil
}
