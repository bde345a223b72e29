package shardnode

import (
	"container/list"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
)

// shard is one owned shard: its store, its live actors and its subscription.
//
// Actor lifecycle: dispatch finds or creates the entity's actor and counts the
// message as pending under mu before queueing it (which starts the actor's
// goroutine if it has none); an actor is only passivated (removed from the
// map) under mu while it has nothing pending. So a message is never queued on
// a passivated actor, and a passivated actor has answered everything it was
// given.
type shard struct {
	node *Service
	// owner is the node's owner when the shard opened: its clock measures
	// the lease. Kept here because a commit cut short by a bounded stop can
	// still reach the fence after the node has dropped its owner.
	owner *owner
	cc    *ContextConfig
	n     int
	store *sqlite.Shard
	// maxReply is the largest answer body the shard's actors may send
	// (Config.MaxReplyBytes): larger pages are cut, larger states refused.
	maxReply int
	sub      *nats.Subscription
	relay    *relay
	// feedCache holds the latest events as the feed shows them (feed.go).
	feedCache *feedCache

	mu         sync.Mutex
	actors     map[string]*actor
	lru        *list.List // front = most recently used
	maxActors  int
	closed     bool
	passivated int64

	// Lease: the one this node serves the shard under. deadline is when
	// (owner.now) writes must stop unless renewed; acquired when it was taken.
	leaseMu       sync.Mutex
	leaseVal      cluster.Lease
	renewedAt     atomic.Int64
	deadline      atomic.Int64
	acquired      time.Duration
	snapshotAt    atomic.Int64 // last position in the last uploaded snapshot
	snapshotTried atomic.Int64
	snapshotDirty atomic.Bool // a forget happened: the uploaded copy must go
	stopOnce      sync.Once

	// checkCtx bounds the background file check (corrupt.go); stopping
	// the shard cancels it. full is set while the disk refuses its writes.
	checkCtx  context.Context
	stopCheck context.CancelFunc
	full      atomic.Bool
	// gone ends when a stop gives up waiting (its ctx ran out; giveUp): a
	// publish in flight is cut short, appends waiting for the stream are
	// answered unavailable, and so is every request still in an actor (one
	// waiting on a keyvault whose bucket lost its quorum, say), instead of
	// each waiting out its own time limit while the stop waits on them.
	// What is committed stays in the shard file's outbox for the next
	// owner's relay.
	gone   context.Context
	giveUp context.CancelFunc

	actorsWG  sync.WaitGroup
	sendsWG   sync.WaitGroup // dispatches between taking mu and filling a mailbox
	stopSweep chan struct{}
	sweepDone chan struct{}
}

func newShard(node *Service, cc *ContextConfig, n int, store *sqlite.Shard, maxActors, maxReply int) *shard {
	sh := &shard{
		node: node, owner: node.owner, cc: cc, n: n, store: store, maxReply: maxReply,
		actors: map[string]*actor{}, lru: list.New(), maxActors: maxActors,
		stopSweep: make(chan struct{}), sweepDone: make(chan struct{}),
	}
	sh.checkCtx, sh.stopCheck = context.WithCancel(context.Background())
	sh.gone, sh.giveUp = context.WithCancel(context.Background())
	sh.relay = newRelay(sh, node.js)
	sh.feedCache = newFeedCache(feedCacheBytes)
	go sh.sweepLoop()
	return sh
}

func (sh *shard) subscribe() error {
	// A queue subscription, though one node serves a shard: during a hand-off
	// the old owner keeps a refusing member in the group (refuse.go), and
	// NATS passes a message that reaches a server whose member just left
	// on to another member, where a plain subscription's would be dropped.
	sub, err := sh.node.nc.QueueSubscribe(kuma.ShardPrefix(sh.cc.Name, sh.n)+">", ShardQueue, sh.onMsg)
	if err != nil {
		return fmt.Errorf("shardnode: subscribe to shard %d of %q: %w", sh.n, sh.cc.Name, err)
	}
	// An actor's mailbox gives the backpressure; the subscription's own
	// buffer only has to absorb bursts.
	if err := sub.SetPendingLimits(1<<16, 256<<20); err != nil {
		return err
	}
	sh.sub = sub
	return nil
}

// onMsg runs on the subscription's goroutine: it only checks the address and
// hands the message to the entity's actor, which does the work.
func (sh *shard) onMsg(msg *nats.Msg) {
	if !kuma.ReplyAllowed(msg.Reply) {
		// Answering would publish into the namespace the reply names
		// (an event stream, a KV bucket): drop the request unanswered.
		sh.node.metrics.requests.WithLabelValues("unknown", string(kuma.CodeForbidden)).Inc()
		sh.node.cfg.Logger.Debug("request dropped: its reply subject is in a reserved namespace", "reply", msg.Reply)
		return
	}
	if msg.Subject == kuma.ShardFeedSubject(sh.cc.Name, sh.n) {
		select {
		case sh.node.feedSlots <- struct{}{}:
			go sh.serveFeed(msg)
		default:
			sh.replyFeed(msg, nil, kuma.Errorf(kuma.CodeUnavailable, "this node serves %d feed requests already; retry", maxFeedRequests))
		}
		return
	}
	if msg.Subject == kuma.ShardBackupSubject(sh.cc.Name, sh.n) {
		go sh.serveBackup(msg)
		return
	}
	op, entity, ok := kuma.ParseShardSubject(msg.Subject)
	if !ok {
		sh.replyError(msg, kuma.Errorf(kuma.CodeNotFound, "unknown subject %q", msg.Subject))
		return
	}
	if err := kuma.ValidateEntityID(entity); err != nil {
		sh.replyError(msg, err)
		return
	}
	if !knownOp(op) {
		sh.replyError(msg, kuma.Errorf(kuma.CodeNotFound, "unknown operation %q", op))
		return
	}
	if want := placement.ShardOf(entity, sh.cc.Shards); want != sh.n {
		// A client routing by itself with the wrong shard count would
		// otherwise split an entity's history over two files.
		sh.replyError(msg, kuma.Errorf(kuma.CodeBadRequest,
			"entity %q belongs to shard %d of %d, not shard %d", entity, want, sh.cc.Shards, sh.n))
		return
	}
	// A request lives no longer than the shard's patience: a stop that
	// gives up (gone) ends it.
	sh.dispatch(entity, &request{op: op, msg: msg, ctx: telemetry.Extract(sh.gone, msg.Header)})
}

func knownOp(op string) bool {
	switch op {
	case kuma.OpAppend, kuma.OpRead, kuma.OpHistory, kuma.OpExport, kuma.OpForget:
		return true
	}
	return false
}

func (sh *shard) replyError(msg *nats.Msg, err error) {
	op, _, ok := kuma.ParseShardSubject(msg.Subject)
	if !ok || !knownOp(op) {
		op = "unknown"
	}
	sh.node.metrics.requests.WithLabelValues(op, string(kuma.ErrorCode(err))).Inc()
	if rerr := natsbus.RespondError(sh.node.nc, msg, err); rerr != nil {
		sh.node.metrics.replyFailed(op, rerr)
		sh.node.cfg.Logger.Warn("reply failed", "subject", msg.Subject, "err", rerr)
	}
}

func (sh *shard) dispatch(entity string, req *request) {
	sh.mu.Lock()
	if sh.closed {
		sh.mu.Unlock()
		sh.replyError(req.msg, kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q is stopping; retry", sh.n, sh.cc.Name))
		return
	}
	a := sh.actors[entity]
	if a == nil {
		// MaxActors is a hard bound. Busy actors cannot be passivated, so
		// without this a flood of requests for distinct entities (reads of
		// ids nobody wrote, say) held one actor per request in flight,
		// up to the subscription's 65,536 pending messages per shard, far
		// past the bound. With every actor busy the request is refused as
		// unavailable instead, which the router sends again for a while
		// and clients retry: backpressure, not growth.
		if !sh.makeRoomLocked() {
			sh.mu.Unlock()
			sh.replyError(req.msg, kuma.Errorf(kuma.CodeUnavailable,
				"shard %d of %q is busy with %d entities, its share of the node's actors; retry", sh.n, sh.cc.Name, sh.maxActors))
			return
		}
		a = newActor(sh, entity)
		sh.actors[entity] = a
		a.elem = sh.lru.PushFront(a)
	} else {
		sh.lru.MoveToFront(a.elem)
	}
	a.pending.Add(1)
	a.lastUsed = sh.node.cfg.Now()
	sh.sendsWG.Add(1)
	sh.mu.Unlock()
	// A full mailbox is refused, not waited on: this runs on the shard's
	// NATS callback, so waiting for one hot entity would stall every other
	// entity of the shard behind it.
	if !a.enqueue(req) {
		a.pending.Add(-1)
		sh.node.metrics.mailboxFull.Inc()
		sh.replyError(req.msg, kuma.Errorf(kuma.CodeUnavailable,
			"entity %q has %d requests waiting; retry", entity, sh.node.cfg.MailboxLen))
	}
	sh.sendsWG.Done()
}

// makeRoomLocked passivates least recently used idle actors until the shard
// has room for one more within its share of MaxActors, and reports whether
// it has. Busy actors are skipped (they move to the front, so the next call
// looks at others); the scan is bounded so one call stays O(1) amortised.
func (sh *shard) makeRoomLocked() bool {
	for i := 0; sh.lru.Len() >= sh.maxActors && i < 32; i++ {
		back := sh.lru.Back()
		a := back.Value.(*actor)
		if a.pending.Load() > 0 {
			sh.lru.MoveToFront(back)
			continue
		}
		sh.passivateLocked(a)
	}
	return sh.lru.Len() < sh.maxActors
}

func (sh *shard) passivateLocked(a *actor) {
	delete(sh.actors, a.id)
	sh.lru.Remove(a.elem)
	sh.passivated++
}

// sweepLoop passivates actors idle for longer than IdleTimeout. The LRU list
// is ordered by last use, so it only ever looks at the stale tail.
func (sh *shard) sweepLoop() {
	defer close(sh.sweepDone)
	idle := sh.node.cfg.IdleTimeout
	every := min(max(idle/4, 10*time.Millisecond), 5*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-sh.stopSweep:
			return
		case <-t.C:
		}
		cutoff := sh.node.cfg.Now().Add(-idle)
		sh.mu.Lock()
		for e := sh.lru.Back(); e != nil; {
			a := e.Value.(*actor)
			if !a.lastUsed.Before(cutoff) {
				break
			}
			prev := e.Prev()
			if a.pending.Load() == 0 {
				sh.passivateLocked(a)
			}
			e = prev
		}
		sh.mu.Unlock()
	}
}

// close stops serving and closes the store.
func (sh *shard) close(ctx context.Context) error {
	sh.stopServing(ctx)
	return sh.store.Close()
}

// stopServing stops the subscription, waits for the messages it already
// took, passivates every actor and lets the relay publish what was
// committed. The store stays open (a hand-off copies it next).
func (sh *shard) stopServing(ctx context.Context) {
	sh.stopOnce.Do(func() { sh.stopServingOnce(ctx) })
}

func (sh *shard) stopServingOnce(ctx context.Context) {
	// Past ctx the stream and the requests in flight are given up on
	// (gone): they are answered, not acknowledged, and the relay stops
	// publishing, so that a stream or a keyvault without a quorum does not
	// hold the stop up. What is committed stays in the outbox for the next
	// owner.
	defer context.AfterFunc(ctx, sh.giveUp)()
	sh.stopCheck()
	if sh.sub != nil {
		if err := sh.sub.Drain(); err == nil {
			for sh.sub.IsValid() {
				select {
				case <-ctx.Done():
					sh.node.cfg.Logger.Warn("shard drain cut short", "shard", sh.n, "err", ctx.Err())
					goto drained
				case <-time.After(5 * time.Millisecond):
				}
			}
		}
	}
drained:
	close(sh.stopSweep)
	<-sh.sweepDone
	sh.mu.Lock()
	sh.closed = true
	sh.mu.Unlock()
	sh.sendsWG.Wait() // every dispatch in flight has queued its request
	sh.mu.Lock()
	for _, a := range sh.actors {
		delete(sh.actors, a.id)
	}
	sh.lru.Init()
	sh.mu.Unlock()
	sh.actorsWG.Wait() // in-flight commits finish here
	if sh.relay.running.Load() {
		sh.relay.close(ctx) // publish what was committed
	}
}

func (sh *shard) stats() ShardStats {
	sh.mu.Lock()
	live, passivated := len(sh.actors), sh.passivated
	sh.mu.Unlock()
	st := sh.store.Stats()
	pub := sh.relay.published.Load()
	return ShardStats{Context: sh.cc.Name, Shard: sh.n, LiveActors: live, Passivated: passivated, Store: st,
		Published: pub, RelayLag: max(0, st.LastSeq-pub)}
}
