package shardnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// ClusterConfig tunes membership, leases and shard moves. The zero value
// suits a LAN; tests shorten the times.
type ClusterConfig struct {
	// Replicas of the stream, the KV buckets and the snapshot store (default
	// 1; 3 once the NATS cluster has three JetStream servers).
	Replicas int
	// Heartbeat is how often the node renews its membership (default 1 s);
	// MemberTTL how long a silent member counts as alive (default 5 s).
	Heartbeat time.Duration
	MemberTTL time.Duration
	// LeaseTTL is how long a shard lease lasts without renewal (default 6 s).
	// The holder renews every LeaseTTL/4 and stops writing at 3/4 of it.
	LeaseTTL time.Duration
	// Tick is how often the node compares the shard map with where shards
	// should be (default 500 ms).
	Tick time.Duration
	// MaxMoves bounds the shards this node hands off or takes at once
	// (default 2), so a join is a trickle of moves, not a storm.
	MaxMoves int
	// MinHold is how long a node keeps a shard it just took before it may
	// move it again (default 3 s), so views that disagree for a moment do
	// not bounce a shard between two nodes.
	MinHold time.Duration
	// SnapshotEvery uploads a snapshot of each owned shard that changed, so
	// a failover replays little of the stream (default 1 minute; negative:
	// only on moves).
	SnapshotEvery time.Duration
}

func (c *ClusterConfig) setDefaults() {
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	if c.Heartbeat <= 0 {
		c.Heartbeat = time.Second
	}
	if c.MemberTTL <= 0 {
		c.MemberTTL = 5 * c.Heartbeat
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 6 * time.Second
	}
	if c.Tick <= 0 {
		c.Tick = 500 * time.Millisecond
	}
	if c.MaxMoves <= 0 {
		c.MaxMoves = 2
	}
	if c.MinHold <= 0 {
		c.MinHold = 3 * time.Second
	}
	if c.SnapshotEvery == 0 {
		c.SnapshotEvery = time.Minute
	}
}

// Durability settings of a context: what an acknowledged append survives.
const (
	// DurabilityLocal acknowledges after the local fsync. Losing the node's
	// disk for good loses what it had not yet published to the stream
	// (normally a few milliseconds of appends; see relay lag in status).
	DurabilityLocal = "local"
	// DurabilityReplicated acknowledges once the stream (replicated by the
	// NATS cluster) has the events too: losing a node loses nothing
	// acknowledged.
	DurabilityReplicated = "replicated"
)

type shardKey struct {
	ctx string
	n   int
}

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
	return o.store.Heartbeat(ctx, cluster.Member{Started: o.s.started, Draining: draining, Contexts: o.contexts(), Refuses: o.s.refusedShards()})
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
	return append(ms, cluster.Member{Node: o.s.cfg.NodeName, Draining: o.draining, Contexts: o.contexts(), Refuses: refuses})
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
			o.reconcile(context.Background(), false)
			o.endRefusals()
		case <-o.store.Changed():
			// A shard released to this node, a pin, a member: act now
			// rather than on the next tick.
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
				if want != "" && want != me && o.store.Alive(want) && o.now()-sh.acquired > o.cfg.MinHold &&
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
			var prev *cluster.Lease
			switch {
			case !ok:
				if want != me {
					continue
				}
			case lease.Owner == "" && (want == me || lease.HandoffTo == me):
				prev = &lease
			case lease.Owner == me:
				// Our own earlier incarnation (a restart): no need to wait for
				// the lease to run out. Taken back even when the shard should
				// live elsewhere now (a kill in the middle of its hand-off):
				// nobody else takes a lease whose owner is alive, and only
				// this node's file may hold its last commits. The next
				// reconcile hands it on as usual.
				prev = &lease
			case lease.Owner != "" && lease.Owner != me && want == me &&
				lease.Expired(now, o.cfg.LeaseTTL) && !o.store.Alive(lease.Owner):
				prev = &lease // failover
			default:
				continue
			}
			what := "taking over"
			if prev != nil && prev.Owner != "" && prev.Owner != me {
				what = "failing over from " + prev.Owner
			}
			if !o.beginMove(k, what, sync) {
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

func (o *owner) goMove(fn func()) {
	o.done.Add(1)
	go func() {
		defer o.done.Done()
		fn()
	}()
}

// renew moves the lease on when a third of it has passed. A conflict means
// another node has the shard: this one stops serving it at once. Failing to
// reach the bucket only lets the deadline run out, which stops the writes
// by itself (the fence in every commit).
func (o *owner) renew(sh *shard) {
	if o.now()-time.Duration(sh.renewedAt.Load()) < o.cfg.LeaseTTL/4 {
		return
	}
	sent := o.now()
	ctx, cancel := context.WithTimeout(context.Background(), o.cfg.LeaseTTL/4)
	defer cancel()
	l, err := o.store.Renew(ctx, sh.lease())
	switch {
	case errors.Is(err, cluster.ErrConflict):
		o.s.lostShard(sh, "its lease was taken")
	case err != nil:
		o.s.cfg.Logger.Warn("lease renewal failed", "context", sh.cc.Name, "shard", sh.n, "err", err)
		if o.now()-time.Duration(sh.renewedAt.Load()) > o.cfg.LeaseTTL {
			o.s.lostShard(sh, "its lease ran out")
		}
	default:
		sh.setLease(l, sent, o.cfg.LeaseTTL)
	}
}

// take acquires a shard's lease and opens it: from the local file or the
// uploaded snapshot, whichever is further, caught up from the stream, and
// claimed in the stream before the first request is served.
func (o *owner) take(ctx context.Context, cc *ContextConfig, n int, prev *cluster.Lease) {
	k := shardKey{cc.Name, n}
	defer o.endMove(k)
	// The caller saw the shard unserved before it began this move, and a
	// take that finished in between (it holds the move until the shard is
	// served) makes that stale: its lease then reads as this node's own,
	// and taking it again would open a second instance of the shard on the
	// same file, both serving. Checked here, under the move, it is exact.
	if o.s.shardAt(k) != nil {
		return
	}
	log := o.s.cfg.Logger.With("context", cc.Name, "shard", n)
	start := time.Now()
	// A first lease starts above any epoch a copy of the shard was written
	// under (the buckets may be younger than the files).
	floor := int64(1)
	if prev == nil {
		floor = o.s.highestEpoch(ctx, cc, n) + 1
	}
	sent := o.now()
	actx, cancel := context.WithTimeout(ctx, o.cfg.LeaseTTL/2)
	lease, err := o.store.Acquire(actx, cc.Name, n, prev, floor)
	cancel()
	if err != nil {
		if !errors.Is(err, cluster.ErrConflict) {
			log.Warn("could not take the shard's lease", "err", err)
		}
		return
	}
	o.s.cfg.Failpoint("takeover-after-lease")
	sh, err := o.s.openOwned(ctx, cc, n, lease, prev, sent)
	if err != nil {
		if sqlite.IsCorrupt(err) {
			o.s.shardCorrupt(cc.Name, n, err) // logs once; the reconcile loop leaves it alone
		} else {
			log.Error("could not open the shard; releasing it", "err", err)
		}
		o.releaseUnserved(lease, log)
		return
	}
	// Tell the previous owner this node answers now, so that it stops
	// refusing the shard's requests (refuse.go). Before addShard, so that
	// no renewal races this write. Failing only keeps the previous owner
	// refusing longer: every refused request is sent again.
	served := o.now()
	sctx, scancel := context.WithTimeout(ctx, o.cfg.LeaseTTL/4)
	l, err := o.store.Serve(sctx, lease)
	scancel()
	switch {
	case err == nil:
		sh.setLease(l, served, o.cfg.LeaseTTL)
	case errors.Is(err, cluster.ErrConflict):
		log.Warn("the shard's lease changed while it was being opened; letting it go")
		sh.stopServing(ctx)
		_ = sh.store.Close()
		return
	default:
		// Not served unmarked: the next taker would not know this epoch
		// wrote anything (Lease.Wrote) and could trust a copy that lacks
		// its events. The control loop takes the shard again.
		log.Warn("could not mark the lease serving; letting the shard go", "err", err)
		sh.stopServing(ctx)
		_ = sh.store.Close()
		o.releaseUnserved(lease, log)
		return
	}
	o.s.addShard(sh)
	o.unrefuse(k) // this node had handed it off, and has it back
	o.s.metrics.moves.WithLabelValues("in").Inc()
	log.Info("shard taken", "epoch", lease.Epoch, "events", sh.store.LastSeq(), "took", time.Since(start).Round(time.Millisecond))
	if o.s.isCorrupt(k) {
		// Found damaged while it opened (the relay's first read, say):
		// shardCorrupt ran before the shard was served.
		o.s.retireCorrupt(k)
		return
	}
	o.s.checkInBackground(sh)
}

// releaseUnserved gives up the lease of a take that did not get as far as
// serving, so that the control loop (here or elsewhere) takes it again.
func (o *owner) releaseUnserved(lease cluster.Lease, log *slog.Logger) {
	limit := o.cfg.LeaseTTL / 2
	if o.moves.Err() != nil {
		limit = stopWriteMax // cut short by a stop, which must not wait on the buckets
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	if _, err := o.store.Release(ctx, lease, ""); err != nil {
		log.Warn("release failed", "err", err)
	}
}

// handoff moves a shard to another node: stop taking requests, finish what
// was taken, publish the outbox, upload a consistent copy, release the lease
// naming the new owner. Requests in between find no responder (clients
// retry, the Go client by itself). ctx bounds it. A hand-off that fails
// while the node runs serves the shard again; one that fails while it stops
// (stopping) leaves the shard, stopped, for Stop to close with the others.
func (o *owner) handoff(ctx context.Context, sh *shard, to string, stopping bool) {
	k := shardKey{sh.cc.Name, sh.n}
	defer o.endMove(k)
	log := o.s.cfg.Logger.With("context", sh.cc.Name, "shard", sh.n, "to", to)
	start := time.Now()
	o.s.removeShard(sh)
	o.refuse(sh, to) // before the serving member leaves: see refuse.go
	sh.stopServing(ctx)
	o.s.cfg.Failpoint("handoff-after-stop")
	err := o.upload(ctx, sh)
	if err != nil && (stopping || o.moves.Err() != nil) {
		// Reopening would wait on the same stream and buckets that just
		// failed, or was cut short by the stop; the node is leaving
		// anyway, and Stop hands the shard off again or closes it. Nobody
		// was named, so nobody serves it meanwhile: stop refusing.
		log.Warn("hand-off failed; the shard closes with the node", "err", err)
		o.unrefuse(k)
		o.s.addShard(sh)
		return
	}
	if err != nil {
		// Keep the shard: reopen it under the same lease and try later.
		log.Warn("hand-off failed; serving the shard again", "err", err)
		if cerr := sh.store.Close(); cerr != nil {
			log.Warn("close", "err", cerr)
		}
		l := sh.lease()
		re, rerr := o.s.openOwned(ctx, sh.cc, sh.n, l, &l, time.Duration(sh.renewedAt.Load()))
		if rerr != nil {
			log.Error("could not reopen the shard; releasing it", "err", rerr)
			_, _ = o.store.Release(ctx, l, "")
			return
		}
		o.s.addShard(re)
		o.unrefuse(k)
		return
	}
	o.s.cfg.Failpoint("handoff-after-upload")
	if err := sh.store.Close(); err != nil {
		log.Warn("close", "err", err)
	}
	if _, err := o.store.Release(ctx, sh.lease(), to); err != nil && !errors.Is(err, cluster.ErrConflict) {
		log.Warn("release failed; the lease will run out instead", "err", err)
		if stopping || o.moves.Err() != nil {
			o.unrefuse(k) // nobody takes it before the lease runs out
		}
	}
	o.s.metrics.moves.WithLabelValues("out").Inc()
	log.Info("shard handed off", "events", sh.store.LastSeq(), "took", time.Since(start).Round(time.Millisecond))
}

// upload writes a consistent copy of the shard to the snapshot store.
func (o *owner) upload(ctx context.Context, sh *shard) error {
	// Published and the stream sequence are read before the copy is made:
	// the copy holds at least that much, so a catch-up from StreamSeq never
	// misses an event.
	streamSeq, published := sh.relay.subjSeq.Load(), sh.relay.published.Load()
	if err := sh.store.SetPublished(ctx, published); err != nil {
		return err
	}
	tmp := shardPath(o.s.cfg.DataDir, sh.cc.Name, sh.n) + ".upload"
	_ = os.Remove(tmp)
	defer os.Remove(tmp)
	info, err := sh.store.Backup(ctx, tmp)
	if err != nil {
		return err
	}
	err = o.store.PutSnapshot(ctx, tmp, cluster.Snapshot{Context: sh.cc.Name, Shard: sh.n, Epoch: sh.lease().Epoch,
		LastSeq: info.LastSeq, Published: info.Published, StreamSeq: streamSeq, Bytes: info.Bytes})
	if err == nil {
		sh.snapshotAt.Store(info.LastSeq)
	}
	return err
}

// snapshotIfDue uploads a snapshot of a changed shard every SnapshotEvery,
// in the background and at most one at a time per shard.
func (o *owner) snapshotIfDue(sh *shard) {
	if o.cfg.SnapshotEvery < 0 || sh.store.LastSeq() == sh.snapshotAt.Load() && !sh.snapshotDirty.Load() {
		return
	}
	if !sh.snapshotDirty.Load() && o.now()-time.Duration(sh.snapshotTried.Load()) < o.cfg.SnapshotEvery {
		return
	}
	k := shardKey{sh.cc.Name, sh.n}
	if !o.beginMove(k, "uploading a snapshot", false) {
		return
	}
	sh.snapshotTried.Store(int64(o.now()))
	o.goMove(func() {
		defer o.endMove(k)
		ctx, cancel := context.WithTimeout(o.moves, time.Minute)
		defer cancel()
		sh.snapshotDirty.Store(false)
		if err := o.upload(ctx, sh); err != nil {
			o.s.cfg.Logger.Warn("snapshot upload failed", "context", sh.cc.Name, "shard", sh.n, "err", err)
		}
	})
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

// fenceErr is what a commit gets once the shard's lease has run out.
func (sh *shard) fence() error {
	if sh.owner.now() > time.Duration(sh.deadline.Load()) {
		sh.node.metrics.fenced.WithLabelValues("lease").Inc()
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

// openOwned opens a shard this node has just leased: it picks the
// furthest trustworthy copy (local file or uploaded snapshot), catches it up
// from the stream and claims the shard in the stream.
func (s *Service) openOwned(ctx context.Context, cc *ContextConfig, n int, lease cluster.Lease, prev *cluster.Lease, sent time.Duration) (*shard, error) {
	// A copy written under the previous epoch holds that owner's whole
	// history only if the owner got as far as serving (it marks its lease
	// Serving once caught up): a taker that failed half-way through its
	// catch-up leaves a file stamped with its epoch but short of the stream.
	// A copy marked whole as of the last epoch that served, or later, is
	// whole too, whatever takes failed since (they wrote nothing).
	prevEpoch, wrote := int64(0), int64(0)
	if prev != nil {
		prevEpoch, wrote = prev.Epoch, prev.LastServed()
		if !prev.Serving {
			prevEpoch = -prev.Epoch // matches no copy's epoch
		}
	}
	path := shardPath(s.cfg.DataDir, cc.Name, n)
	base, err := s.chooseBase(ctx, cc, n, path, prevEpoch, wrote)
	if err != nil {
		return nil, err
	}
	sh, err := s.openShard(ctx, cc, n, lease, sent)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*shard, error) {
		sh.stopServing(ctx)
		_ = sh.store.Close()
		return nil, err
	}
	if base.truncate {
		dropped, err := sh.store.TruncateAfter(ctx, base.trusted)
		if err != nil {
			return fail(err)
		}
		if dropped > 0 {
			s.cfg.Logger.Warn("dropped events this node committed but never published before another node took the shard over",
				"context", cc.Name, "shard", n, "events", dropped)
		}
	}
	if err := sh.catchUpAndClaim(ctx, base.fromStreamSeq, lease.Epoch); err != nil {
		return fail(err)
	}
	if err := sh.finishForgets(ctx); err != nil {
		return fail(err)
	}
	if err := sh.relay.resume(ctx); err != nil {
		return fail(err)
	}
	// Caught up and claimed: the file is the shard's whole history as of
	// this epoch, before the lease says Serving (what a failed take after
	// this one trusts).
	if err := sh.store.MarkWhole(ctx); err != nil {
		return fail(err)
	}
	sh.relay.start()
	if err := sh.subscribe(); err != nil {
		return fail(err)
	}
	return sh, nil
}

type baseChoice struct {
	trusted       int64  // positions up to here are the shard's true history
	truncate      bool   // drop what lies after trusted
	fromStreamSeq uint64 // catch up from the stream after this sequence
}

// chooseBase puts the best starting copy at path. A copy written under the
// lease's previous epoch (when it served) is the latest owner's own and
// trusted whole, and so is a local file marked whole as of wrote, the last
// epoch that served, or later; any other copy only up to what it knew was
// published, since another owner may have written different events after
// that.
func (s *Service) chooseBase(ctx context.Context, cc *ContextConfig, n int, path string, prevEpoch, wrote int64) (baseChoice, error) {
	var local *sqlite.BackupInfo
	if _, err := os.Stat(path); err == nil {
		info, err := sqlite.Inspect(ctx, path)
		if err != nil {
			return baseChoice{}, err
		}
		local = &info
	}
	// With no lease before this one, nobody else has ever owned the shard.
	whole := func(epoch int64) bool { return prevEpoch == 0 || epoch == prevEpoch }
	choice := baseChoice{}
	if local != nil {
		wholeFile := whole(local.Epoch) || wrote > 0 && local.WholeOf >= wrote
		choice.trusted = local.Published
		if wholeFile {
			choice.trusted = local.LastSeq
		}
		choice.truncate = choice.trusted < local.LastSeq
		if wholeFile {
			// The last owner was this file's writer: the stream holds
			// nothing it lacks; the catch-up only reads to the end.
			choice.fromStreamSeq = lastStreamSeqUnknown
		}
	}
	snap, ok, err := s.owner.store.SnapshotInfo(ctx, cc.Name, n)
	if err != nil {
		return baseChoice{}, err
	}
	if ok {
		st := snap.LastSeq
		if !whole(snap.Epoch) {
			st = snap.Published
		}
		if local == nil || st > choice.trusted {
			tmp := path + ".download"
			_ = os.Remove(tmp)
			if err := s.owner.store.GetSnapshot(ctx, cc.Name, n, tmp); err != nil {
				return baseChoice{}, err
			}
			if err := sqlite.CheckIntegrity(ctx, tmp); err != nil {
				_ = os.Remove(tmp)
				return baseChoice{}, fmt.Errorf("shardnode: the uploaded snapshot of shard %d is damaged: %w", n, err)
			}
			// A snapshot uploaded before copies lost the mark still
			// carries its writer's: in place, after a take that fails,
			// it would be trusted whole (sqlite.UnmarkWhole).
			if err := sqlite.UnmarkWhole(ctx, tmp); err != nil {
				_ = os.Remove(tmp)
				return baseChoice{}, err
			}
			for _, suffix := range []string{"-wal", "-shm", ""} {
				if err := os.Remove(path + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
					return baseChoice{}, err
				}
			}
			if err := os.Rename(tmp, path); err != nil {
				return baseChoice{}, err
			}
			choice = baseChoice{trusted: st, truncate: st < snap.LastSeq, fromStreamSeq: snap.StreamSeq}
		}
	}
	return choice, nil
}

// highestEpoch is the newest epoch any copy of the shard carries.
func (s *Service) highestEpoch(ctx context.Context, cc *ContextConfig, n int) int64 {
	var e int64
	if info, err := sqlite.Inspect(ctx, shardPath(s.cfg.DataDir, cc.Name, n)); err == nil {
		e = info.Epoch
	}
	if snap, ok, err := s.owner.store.SnapshotInfo(ctx, cc.Name, n); err == nil && ok {
		e = max(e, snap.Epoch)
	}
	return e
}

// lastStreamSeqUnknown asks the catch-up to start at the subject's current
// end: nothing in the stream is missing from the file.
const lastStreamSeqUnknown = ^uint64(0)

// String names a shard in logs.
func (k shardKey) String() string { return k.ctx + "/" + strconv.Itoa(k.n) }

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
