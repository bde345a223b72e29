package shardnode

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/services/shardnode/entity"
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
	shardDeps // what it needs of its node (sharddeps.go)
	cc        *ContextConfig
	n         int
	store     *sqlite.Shard
	// maxReply is the largest answer body the shard's actors may send
	// (Config.MaxReplyBytes): larger pages are cut, larger states refused.
	maxReply int
	sub      *nats.Subscription
	relay    *relay
	// feedCache holds the latest events as the feed shows them (feed.go).
	feedCache *feedCache

	// ent is what the shard's actors share (entity.Shard).
	ent *entity.Shard

	mu         sync.Mutex
	actors     map[string]*liveActor
	lru        *list.List // front = most recently used
	maxActors  int
	closed     bool
	passivated int64

	// Lease: the one this node serves the shard under. deadline is when
	// (leaseNow) writes must stop unless renewed; acquired when it was taken.
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
	// damaged is set by the first request that met a damaged page
	// (storageError).
	damaged atomic.Bool
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

func newShard(deps shardDeps, cc *ContextConfig, n int, store *sqlite.Shard, maxActors, maxReply int) *shard {
	sh := &shard{
		shardDeps: deps, cc: cc, n: n, store: store, maxReply: maxReply,
		actors: map[string]*liveActor{}, lru: list.New(), maxActors: maxActors,
		stopSweep: make(chan struct{}), sweepDone: make(chan struct{}),
	}
	sh.checkCtx, sh.stopCheck = context.WithCancel(context.Background())
	sh.gone, sh.giveUp = context.WithCancel(context.Background())
	sh.relay = newRelay(relayDeps{
		kctx: cc.Name, n: n, stream: jsStream{js: deps.js, name: kuma.StreamName(cc.Name)}, outbox: store, keys: deps.keys,
		gone: sh.gone, lost: deps.lost,
		maxPayload: deps.nc.MaxPayload, format: deps.streamFormat, logger: deps.logger, tracer: deps.tracer, failpoint: deps.failpoint,
	})
	sh.feedCache = newFeedCache(feedCacheBytes)
	sh.ent = sh.entityShard()
	go sh.sweepLoop()
	return sh
}

// dispatch queues req on the actor of entity, making one if it has none
// (within the shard's share of MaxActors). A request it cannot queue is
// refused with the error returned, which the caller sends back; nil means
// the actor has it and will answer.
func (sh *shard) dispatch(id string, req *entity.Request) error {
	sh.mu.Lock()
	if sh.closed {
		sh.mu.Unlock()
		return kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q is stopping; retry", sh.n, sh.cc.Name)
	}
	a := sh.actors[id]
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
			return kuma.Errorf(kuma.CodeUnavailable,
				"shard %d of %q is busy with %d entities, its share of the node's actors; retry", sh.n, sh.cc.Name, sh.maxActors)
		}
		a = &liveActor{Actor: entity.New(sh.ent, id)}
		sh.actors[id] = a
		a.elem = sh.lru.PushFront(a)
	} else {
		sh.lru.MoveToFront(a.elem)
	}
	a.Reserve()
	a.lastUsed = sh.now()
	sh.sendsWG.Add(1)
	defer sh.sendsWG.Done()
	sh.mu.Unlock()
	// A full mailbox is refused, not waited on: this runs on the shard's
	// NATS callback, so waiting for one hot entity would stall every other
	// entity of the shard behind it.
	if !a.Enqueue(req) {
		a.Unreserve()
		sh.metrics.mailboxFull.Inc()
		return kuma.Errorf(kuma.CodeUnavailable, "entity %q has %d requests waiting; retry", id, sh.mailboxLen)
	}
	return nil
}

// entityShard is what the shard's actors need of it and of the node.
func (sh *shard) entityShard() *entity.Shard {
	var failpoint func(string)
	if sh.hooked {
		failpoint = sh.failpoint
	}
	return &entity.Shard{
		Context: sh.cc.Name, N: sh.n, Reducer: sh.cc.Reducer, Limits: sh.cc.Limits,
		Replicated:    sh.cc.Durability == DurabilityReplicated,
		SnapshotEvery: sh.snapshotEvery, MailboxLen: sh.mailboxLen, MaxReply: sh.maxReply,
		Store: sh.store, Keys: sh.keys, Vault: sh.vault,
		Erase:         sh.erase,
		WaitPublished: sh.relay.waitPublished,
		Published:     sh.relay.published.Load,
		StorageError:  sh.storageError,
		Wrote:         sh.wrote,
		Failpoint:     failpoint,
		Running:       &sh.actorsWG,
		Metrics:       sh.metrics.entity,
		Tracer:        sh.tracer,
		Logger:        sh.logger,
		Now:           sh.now,
	}
}

// liveActor is an actor the shard holds, with its place in the shard's
// LRU list; elem and lastUsed are guarded by the shard's mu.
type liveActor struct {
	*entity.Actor
	elem     *list.Element
	lastUsed time.Time
}

// makeRoomLocked passivates least recently used idle actors until the shard
// has room for one more within its share of MaxActors, and reports whether
// it has. Busy actors are skipped (they move to the front, so the next call
// looks at others); the scan is bounded so one call stays O(1) amortised.
func (sh *shard) makeRoomLocked() bool {
	for i := 0; sh.lru.Len() >= sh.maxActors && i < 32; i++ {
		back := sh.lru.Back()
		a := back.Value.(*liveActor)
		if a.Busy() {
			sh.lru.MoveToFront(back)
			continue
		}
		sh.passivateLocked(a)
	}
	return sh.lru.Len() < sh.maxActors
}

func (sh *shard) passivateLocked(a *liveActor) {
	delete(sh.actors, a.ID())
	sh.lru.Remove(a.elem)
	sh.passivated++
}

// sweepLoop passivates actors idle for longer than IdleTimeout. The LRU list
// is ordered by last use, so it only ever looks at the stale tail.
func (sh *shard) sweepLoop() {
	defer close(sh.sweepDone)
	idle := sh.idleTimeout
	every := min(max(idle/4, 10*time.Millisecond), 5*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-sh.stopSweep:
			return
		case <-t.C:
		}
		cutoff := sh.now().Add(-idle)
		sh.mu.Lock()
		for e := sh.lru.Back(); e != nil; {
			a := e.Value.(*liveActor)
			if !a.lastUsed.Before(cutoff) {
				break
			}
			prev := e.Prev()
			if !a.Busy() {
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
					sh.logger.Warn("shard drain cut short", "shard", sh.n, "err", ctx.Err())
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
		delete(sh.actors, a.ID())
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

// fence is the shard file's Fence (sqlite.Config): run in every commit, it
// refuses the commit once this node's lease on the shard has run out.
func (sh *shard) fence() error {
	if sh.leaseNow() > time.Duration(sh.deadline.Load()) {
		sh.metrics.fenced.WithLabelValues("lease").Inc()
		return kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q: this node's lease ran out (the shard may be moving); retry", sh.n, sh.cc.Name)
	}
	return nil
}

func (sh *shard) lease() cluster.Lease {
	sh.leaseMu.Lock()
	defer sh.leaseMu.Unlock()
	return sh.leaseVal
}

// setLease records a renewal sent at sent (monotonic): writes stay allowed
// until 3/4 of the TTL after it, well before others may take the lease.
func (sh *shard) setLease(l cluster.Lease, sent time.Duration, ttl time.Duration) {
	sh.leaseMu.Lock()
	sh.leaseVal = l
	sh.leaseMu.Unlock()
	sh.renewedAt.Store(int64(sent))
	sh.deadline.Store(int64(sent + ttl*3/4))
}
