package shardnode

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
)

// shardKey names one shard of one context.
type shardKey struct {
	ctx string
	n   int
}

// String names a shard in logs.
func (k shardKey) String() string { return k.ctx + "/" + strconv.Itoa(k.n) }

// owner is the node's part in the cluster: it heartbeats, renews the
// leases of the shards it serves, and moves shards to where they should be.
type owner struct {
	s     *Service
	store *cluster.Store
	cfg   ClusterConfig
	base  time.Time // monotonic origin of lease deadlines

	mu       sync.Mutex
	moving   map[shardKey]string   // shard → what is happening to it
	refusing map[shardKey]*refusal // shards handed off, refused until the next owner serves (refuse.go)
	failing  map[shardKey]takeFailures
	draining bool

	stop chan struct{}
	done sync.WaitGroup
	// moves is the parent of every move's context: a stop cancels it when
	// the moves under way have had their time (stop.go), so that a take or
	// an upload waiting on a stream that lost its quorum (the whole cluster
	// stopping) does not hold the stop up.
	moves      context.Context
	abortMoves context.CancelFunc
}

func (o *owner) now() time.Duration { return time.Since(o.base) }

// beginMove marks a shard busy; false when it already is or the node is at
// MaxMoves (force skips the bound: start-up and shutdown).
func (o *owner) beginMove(k shardKey, what string, force bool) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, busy := o.moving[k]; busy {
		return false
	}
	if !force && len(o.moving) >= o.cfg.MaxMoves {
		return false
	}
	o.moving[k] = what
	return true
}

func (o *owner) endMove(k shardKey) {
	o.mu.Lock()
	delete(o.moving, k)
	o.mu.Unlock()
}

// Moves lists the shards this node is moving.
func (s *Service) Moves() []kuma.ShardMove {
	if s.owner == nil {
		return nil
	}
	s.owner.mu.Lock()
	defer s.owner.mu.Unlock()
	out := make([]kuma.ShardMove, 0, len(s.owner.moving))
	for k, w := range s.owner.moving {
		out = append(out, kuma.ShardMove{Node: s.cfg.NodeName, Context: k.ctx, Shard: k.n, What: w})
	}
	return out
}

func (o *owner) heartbeat(ctx context.Context) error {
	o.mu.Lock()
	draining := o.draining
	o.mu.Unlock()
	return o.store.Heartbeat(ctx, cluster.Member{Started: o.s.started, Draining: draining, Contexts: o.contexts(), Refuses: o.s.refusedShards(),
		StreamFormats: kuma.StreamFormats})
}

// contexts names the contexts this node serves, for its member record.
func (o *owner) contexts() []string {
	out := make([]string, len(o.s.cfg.Contexts))
	for i, cc := range o.s.cfg.Contexts {
		out[i] = cc.Name
	}
	return out
}

// members is the live members, this node always among them while it runs.
func (o *owner) members() []cluster.Member {
	ms := o.store.Members()
	for i, m := range ms {
		if m.Node == o.s.cfg.NodeName {
			o.mu.Lock()
			ms[i].Draining = o.draining
			o.mu.Unlock()
			ms[i].Refuses = o.s.refusedShards()
			return ms
		}
	}
	refuses := o.s.refusedShards()
	o.mu.Lock()
	defer o.mu.Unlock()
	return append(ms, cluster.Member{Node: o.s.cfg.NodeName, Draining: o.draining, Contexts: o.contexts(), Refuses: refuses,
		StreamFormats: kuma.StreamFormats})
}

// stopping reports whether Stop has begun (o.stop is closed).
func (o *owner) stopping() bool {
	select {
	case <-o.stop:
		return true
	default:
		return false
	}
}

func (o *owner) run() {
	defer o.done.Done()
	hb := time.NewTicker(o.cfg.Heartbeat)
	defer hb.Stop()
	tick := time.NewTicker(o.cfg.Tick)
	defer tick.Stop()
	for {
		// A stop comes first: select picks at random among ready cases,
		// and a tick or a change ready beside it ran another pass.
		if o.stopping() {
			return
		}
		select {
		case <-o.stop:
			return
		case <-hb.C:
			ctx, cancel := context.WithTimeout(context.Background(), o.cfg.Heartbeat*2)
			if err := o.heartbeat(ctx); err != nil {
				o.s.cfg.Logger.Warn("heartbeat failed", "err", err)
			}
			cancel()
		case <-tick.C:
			o.judgeMembers()
			o.reconcile(context.Background(), false)
			o.endRefusals()
		case <-o.store.Changed():
			// A shard released to this node, a pin, a member: act now
			// rather than on the next tick.
			o.judgeMembers()
			o.reconcile(context.Background(), false)
			o.endRefusals()
		}
	}
}

// reconcile renews what the node serves and moves what is misplaced. At
// start-up (sync) it takes its shards before returning.
func (o *owner) reconcile(ctx context.Context, sync bool) {
	me := o.s.cfg.NodeName
	members := o.members()
	now := o.s.cfg.Now()
	for i := range o.s.cfg.Contexts {
		cc := &o.s.cfg.Contexts[i]
		for n := 0; n < cc.Shards; n++ {
			if !sync && o.stopping() {
				// The node is stopping: with the lease bucket out of
				// quorum (the whole cluster stopping) every renewal waits
				// out its timeout, and a pass over all shards took longer
				// than the stop's whole budget.
				return
			}
			k := shardKey{cc.Name, n}
			if sh := o.s.shardAt(k); sh != nil {
				o.renew(sh)
				want := o.store.Desired(cc.Name, n, members)
				if handOffTo(me, want, o.store.Alive, o.now()-sh.acquired, o.cfg.MinHold) &&
					o.beginMove(k, "handing off to "+want, false) {
					o.goMove(func() {
						ctx, cancel := context.WithTimeout(o.moves, 2*time.Minute)
						defer cancel()
						o.handoff(ctx, sh, want, false)
					})
				}
				o.snapshotIfDue(sh)
				continue
			}
			lease, ok := o.store.Lease(cc.Name, n)
			if o.s.isCorrupt(k) {
				// Out of service here until an operator restores it
				// (corrupt.go); placement gives it to another member, and
				// once one serves it this node stops answering for it.
				if ok && lease.Owner != "" && lease.Owner != me {
					o.s.quietCorrupt(k)
				}
				continue
			}
			want := o.store.Desired(cc.Name, n, members)
			prev, what, take := takeFrom(me, want, lease, ok, now, o.cfg.LeaseTTL, o.store.Alive)
			if !take {
				continue
			}
			if !o.mayTake(k, o.now()) || !o.beginMove(k, what, sync) {
				continue
			}
			if sync {
				o.take(ctx, cc, n, prev)
			} else {
				o.goMove(func() { o.take(o.moves, cc, n, prev) })
			}
		}
	}
}

// takeFailures counts a shard's failed takes in a row, and when the next
// may begin.
type takeFailures struct {
	n    int
	next time.Duration
}

// takeBackoff is the wait after n failed takes in a row: a take that fails
// at once (a stream refusing the claim, a keyvault without quorum) was
// tried again on every pass of the control loop, thousands of times a
// minute, each leaving a consumer on the stream until the server's limit
// refused them all.
func takeBackoff(n int) time.Duration {
	if n <= 0 {
		return 0
	}
	return min(100*time.Millisecond<<min(n-1, 10), 5*time.Second)
}

// mayTake reports whether a take of k may begin at now.
func (o *owner) mayTake(k shardKey, now time.Duration) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return now >= o.failing[k].next
}

// tookShard records how a take of k ended at now.
func (o *owner) tookShard(k shardKey, ok bool, now time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if ok {
		delete(o.failing, k)
		return
	}
	if o.failing == nil {
		o.failing = map[shardKey]takeFailures{}
	}
	f := o.failing[k]
	f.n++
	f.next = now + takeBackoff(f.n)
	o.failing[k] = f
}

func (o *owner) goMove(fn func()) {
	o.done.Add(1)
	go func() {
		defer o.done.Done()
		fn()
	}()
}

// renew moves the lease on when a quarter of it has passed. A conflict
// means another node has the shard: this one stops serving it at once.
// Failing to reach the bucket only lets the deadline run out, which stops
// the writes by itself (the fence in every commit).
func (o *owner) renew(sh *shard) {
	err := o.renewDue(context.Background(), sh)
	switch {
	case errors.Is(err, cluster.ErrConflict):
		o.s.lostShard(sh, "its lease was taken")
	case err != nil:
		o.s.cfg.Logger.Warn("lease renewal failed", "context", sh.cc.Name, "shard", sh.n, "err", err)
		if o.now()-time.Duration(sh.renewedAt.Load()) > o.cfg.LeaseTTL {
			o.s.lostShard(sh, "its lease ran out")
		}
	}
}

// renewDue renews sh's lease once a quarter of it has passed since the
// last renewal, waiting at most another quarter (and no longer than ctx);
// cluster.ErrConflict says another node has taken it.
func (o *owner) renewDue(ctx context.Context, sh *shard) error {
	if o.now()-time.Duration(sh.renewedAt.Load()) < o.cfg.LeaseTTL/4 {
		return nil
	}
	sent := o.now()
	rctx, cancel := context.WithTimeout(ctx, o.cfg.LeaseTTL/4)
	defer cancel()
	l, err := o.store.Renew(rctx, sh.lease())
	if err == nil {
		sh.setLease(l, sent, o.cfg.LeaseTTL)
	}
	return err
}

// lostShard stops serving a shard this node no longer owns (its lease was
// taken, ran out, or the stream fenced it). It does not wait.
func (s *Service) lostShard(sh *shard, why string) {
	if !s.removeShard(sh) {
		return // already going
	}
	s.cfg.Logger.Warn("shard lost; no longer serving it", "context", sh.cc.Name, "shard", sh.n, "why", why)
	s.metrics.moves.WithLabelValues("lost").Inc()
	// Stopping is a move of its own: until this instance has finished its
	// commits and closed the file, the shard is not taken again here (its
	// lease may still read as this node's), so two instances never share
	// the file.
	k := shardKey{sh.cc.Name, sh.n}
	held := s.owner != nil && s.owner.beginMove(k, "letting a lost shard go", true)
	go func() {
		if held {
			defer s.owner.endMove(k)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sh.stopServing(ctx)
		if err := sh.store.Close(); err != nil {
			s.cfg.Logger.Warn("close", "shard", sh.n, "err", err)
		}
	}()
}

// Unserved lists the shards of context kctx placed on this node (by
// rendezvous hashing over the live members, or a pin) that it does not
// serve yet: what keeps it from being ready. It reads only this node's
// caches, so a readiness probe costs no request to other members.
func (s *Service) Unserved(kctx string) []int {
	o := s.owner
	if o == nil {
		return nil
	}
	members := o.members()
	var out []int
	for i := range s.cfg.Contexts {
		cc := &s.cfg.Contexts[i]
		if cc.Name != kctx {
			continue
		}
		for n := 0; n < cc.Shards; n++ {
			if o.store.Desired(kctx, n, members) == s.cfg.NodeName && s.shardAt(shardKey{kctx, n}) == nil {
				out = append(out, n)
			}
		}
	}
	return out
}
