package router

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// shardCounts holds each context's shard count. A router started without
// one (Config.Contexts maps the context to 0) asks a shardnode of the
// context the first time it needs it, and keeps the answer: a context's
// count never changes. So routers need not be told the count a context was
// created with, and cannot be told a wrong one.
type shardCounts struct {
	nc     *nats.Conn
	counts map[string]*shardCount
}

type shardCount struct {
	n  atomic.Int64
	mu sync.Mutex // one question at a time per context
}

// countAsk bounds the question to the shardnodes.
const countAsk = 2 * time.Second

func newShardCounts(nc *nats.Conn, contexts map[string]int) *shardCounts {
	c := &shardCounts{nc: nc, counts: make(map[string]*shardCount, len(contexts))}
	for name, n := range contexts {
		sc := &shardCount{}
		sc.n.Store(int64(n))
		c.counts[name] = sc
	}
	return c
}

// of returns kctx's shard count; ok is false when kctx is not served here.
// A count not yet known is asked for; when no shardnode answers, the error
// is unavailable (retryable: none of them runs yet).
func (c *shardCounts) of(ctx context.Context, kctx string) (n int, ok bool, err error) {
	sc, ok := c.counts[kctx]
	if !ok {
		return 0, false, nil
	}
	if n := sc.n.Load(); n > 0 {
		return int(n), true, nil
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if n := sc.n.Load(); n > 0 { // asked meanwhile
		return int(n), true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, countAsk)
	defer cancel()
	msg, err := c.nc.RequestWithContext(ctx, kuma.ShardCountSubject(kctx), nil)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
			return 0, true, kuma.Errorf(kuma.CodeUnavailable, "context %q: no shardnode told its shard count (none is serving it yet); retry", kctx)
		}
		return 0, true, kuma.Errorf(kuma.CodeUnavailable, "context %q: asking a shardnode for its shard count: %v; retry", kctx, err)
	}
	var r struct {
		kuma.ShardCountReply
		Error *kuma.Error `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &r); err != nil || r.Error != nil || r.Shards < 1 {
		return 0, true, kuma.Errorf(kuma.CodeInternal, "context %q: a shardnode answered its shard count with %.200q", kctx, msg.Data)
	}
	sc.n.Store(int64(r.Shards))
	return r.Shards, true, nil
}
