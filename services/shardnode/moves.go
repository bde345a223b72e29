package shardnode

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/sqlite"
)

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
			o.tookShard(k, false, o.now())
		}
		return
	}
	o.s.cfg.Failpoint("takeover-after-lease")
	sh, err := o.s.openOwned(ctx, cc, n, lease, prev, sent)
	o.tookShard(k, err == nil, o.now())
	if err != nil {
		if sqlite.IsCorrupt(err) {
			_ = o.s.shardCorrupt(cc.Name, n, err) // logs once; the reconcile loop leaves it alone
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
		o.tookShard(k, false, o.now())
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
	// Out of the served set, the shard is no longer renewed by the control
	// loop: the hand-off renews its lease itself until it lets it go, or a
	// relay waiting out a stalled stream would outlast the lease, and the
	// fenced upload would end with the shard released to nobody.
	release := o.keepLease(sh)
	defer release()
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
		o.reopen(ctx, sh, release, log)
		return
	}
	o.s.cfg.Failpoint("handoff-after-upload")
	if err := sh.store.Close(); err != nil {
		log.Warn("close", "err", err)
	}
	release() // the release below needs the lease's last revision
	if _, err := o.store.Release(ctx, sh.lease(), to); err != nil && !errors.Is(err, cluster.ErrConflict) {
		log.Warn("release failed; the lease will run out instead", "err", err)
		if stopping || o.moves.Err() != nil {
			o.unrefuse(k) // nobody takes it before the lease runs out
		}
	}
	o.s.metrics.moves.WithLabelValues("out").Inc()
	log.Info("shard handed off", "events", sh.store.LastSeq(), "took", time.Since(start).Round(time.Millisecond))
}

// reopen serves sh again after its hand-off failed, under the lease the
// hand-off renews (keep stops those renewals). Its file may hold events the
// stream does not: the relay gives up on a stream that refuses or stalls.
// Those were acknowledged (local durability), and a shard released to
// nobody is taken from the stream and an older snapshot, without them. So
// while they are there the shard is not let go: the reopen is tried again,
// the lease kept, until it succeeds, the lease runs out (renewals failing:
// the buckets lost their quorum), or the node stops, which reopens the file
// at its next start. With nothing unpublished, a failed reopen releases the
// lease, and any node may take the shard from the stream.
func (o *owner) reopen(ctx context.Context, sh *shard, keep func(), log *slog.Logger) {
	k := shardKey{sh.cc.Name, sh.n}
	unpublished := sh.store.LastSeq() - sh.relay.published.Load()
	for attempt := 1; ; attempt++ {
		l := sh.lease()
		actx, cancel := ctx, context.CancelFunc(func() {})
		if attempt > 1 {
			// The hand-off's own time may be spent: each later try gets
			// its own, ended by the node's stop.
			actx, cancel = context.WithTimeout(o.moves, 2*o.cfg.LeaseTTL)
		}
		re, err := o.s.openOwned(actx, sh.cc, sh.n, l, &l, time.Duration(sh.renewedAt.Load()))
		cancel()
		if err == nil {
			keep() // from here the control loop renews the reopened shard
			re.setLease(sh.lease(), time.Duration(sh.renewedAt.Load()), o.cfg.LeaseTTL)
			o.s.addShard(re)
			o.unrefuse(k)
			if attempt > 1 {
				log.Info("shard served again after a failed hand-off", "attempts", attempt)
			}
			return
		}
		switch {
		case unpublished <= 0:
			keep()
			log.Error("could not reopen the shard; releasing it (the stream has all its events)", "err", err)
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), o.cfg.LeaseTTL/2)
			_, _ = o.store.Release(rctx, sh.lease(), "")
			rcancel()
			return // the refusal ends when the next owner serves
		case o.moves.Err() != nil:
			keep()
			log.Warn("could not reopen the shard before the node stopped; its file keeps the events the stream lacks for the next start",
				"unpublished", unpublished, "err", err)
			o.unrefuse(k)
			return
		case o.now() > time.Duration(sh.deadline.Load()):
			keep()
			log.Error("could not reopen the shard, and its lease ran out: the next owner takes it without the events only this node's file holds",
				"unpublished", unpublished, "err", err)
			return
		}
		log.Warn("could not reopen the shard; keeping its lease and trying again (its file holds events the stream lacks)",
			"unpublished", unpublished, "attempt", attempt, "err", err)
		select {
		case <-o.moves.Done():
		case <-time.After(min(time.Duration(attempt)*time.Second, 5*time.Second)):
		}
	}
}

// keepLease renews sh's lease in the background while a move works on a
// shard the control loop no longer renews, until the returned func is
// called (more than once is fine). That func cuts a renewal in flight short,
// so that a stop never waits on the lease bucket for it, and returns once
// the renewals have ended: sh.lease() is then the last revision this node
// knows (a renewal cut short may have landed: the release after it then
// conflicts, and the lease runs out instead). A conflict (the lease was
// taken) ends the renewals: the fence in every commit then stops the move's
// writes.
func (o *owner) keepLease(sh *shard) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(min(o.cfg.Tick, o.cfg.LeaseTTL/8))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			err := o.renewDue(ctx, sh)
			switch {
			case err == nil: // renewed, or not due yet
			case ctx.Err() != nil:
				return
			case errors.Is(err, cluster.ErrConflict):
				o.s.cfg.Logger.Warn("the lease of a shard being moved was taken", "context", sh.cc.Name, "shard", sh.n)
				return
			default:
				o.s.cfg.Logger.Warn("lease renewal failed", "context", sh.cc.Name, "shard", sh.n, "err", err)
			}
		}
	}()
	return func() {
		cancel()
		<-finished
	}
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
