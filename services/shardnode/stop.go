package shardnode

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
)

// A stop must fit in the grace period the node is given (docker-compose
// waits 10 s, then kills) even when every other node stops at the same
// moment. Then every step that needs an answer from a peer can hang: a
// hand-off to a node that is itself leaving is never taken, and once two of
// three servers are gone the stream and the buckets (three replicas) have
// no quorum, so a publish, a snapshot upload or a lease write waits out its
// timeout. So each such step has a bound, and giving up is safe: a shard
// that is not handed off closes with the node, its events in its file and
// (what was published) in the stream; a lease that is not released runs
// out, and until then nobody else writes the shard, while this node's own
// restart takes it back at once.
const (
	// stopBudget bounds Stop as a whole, whatever the caller's ctx allows.
	stopBudget = 6 * time.Second
	// stopMovesMax is how long the moves under way (a take, a hand-off, a
	// snapshot upload) may go on before Stop cancels them.
	stopMovesMax = 2 * time.Second
	// stopWriteMax bounds each write to the buckets: the draining
	// heartbeat, a lease release, leaving the members.
	stopWriteMax = time.Second
	// The hand-offs must be done stopHandoffsLeft before the budget ends,
	// the wait for their new owners to serve stopRefuseLeft before, and the
	// shards that close with the node stopCloseLeft before; what remains
	// is for releasing their leases and leaving the members.
	stopHandoffsLeft = 3 * time.Second
	stopRefuseLeft   = 2 * time.Second
	stopCloseLeft    = time.Second
	// stopCloseMax bounds finishing the in-flight commits and publishing
	// the outbox of the shards that close with the node.
	stopCloseMax = time.Second
)

// Leaving announces that the node is about to stop: it is marked draining
// in the members at once (within stopWriteMax), so that peers stop placing
// shards on it, while the modules stopped before the shardnode (the router
// waiting for its last answers) take their time. Its own control loop
// starts handing its shards on meanwhile; Stop does the rest. A node whose
// peers stop at the same moment sees them draining sooner and hands them
// nothing.
func (s *Service) Leaving(ctx context.Context) {
	o := s.owner
	if o == nil {
		return
	}
	o.mu.Lock()
	o.draining = true
	o.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, min(o.cfg.Heartbeat*2, stopWriteMax))
	defer cancel()
	if err := o.heartbeat(ctx); err != nil {
		s.cfg.Logger.Warn("could not announce draining", "err", err)
	}
}

// Stop hands the node's shards to the other members (when there are any),
// stops taking requests, waits for requests already taken (and their
// commits) to finish, closes every shard file and leaves the cluster. It
// returns within stopBudget, sooner if ctx ends; see above for what it
// gives up on then.
func (s *Service) Stop(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, stopBudget)
	defer cancel()
	deadline, _ := ctx.Deadline()
	start := time.Now()
	var took []any // each phase's time, logged at the end: what a slow stop waited on
	before := func(left time.Duration) (context.Context, context.CancelFunc) {
		return context.WithDeadline(ctx, deadline.Add(-left))
	}
	if o := s.owner; o != nil {
		close(o.stop)
		abort := time.AfterFunc(stopMovesMax, o.abortMoves)
		o.done.Wait() // the control loop and the moves it started
		abort.Stop()
		took = append(took, "moves", time.Since(start).Round(time.Millisecond))
		mark := time.Now()
		dctx, dcancel := before(stopHandoffsLeft)
		o.drain(dctx)
		dcancel()
		took = append(took, "handoffs", time.Since(mark).Round(time.Millisecond))
		mark = time.Now()
		// Keep refusing the shards handed off until their new owners serve
		// them (refuse.go): leaving at once could lose a request on its way
		// to this node. A new owner that is leaving too never will.
		wait, wcancel := before(stopRefuseLeft)
		for o.endRefusals(); o.abandonRefusals() > 0 && wait.Err() == nil; o.endRefusals() {
			select {
			case <-wait.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
		wcancel()
		o.abortMoves()
		took = append(took, "refusals", time.Since(mark).Round(time.Millisecond), "still_refusing", o.refusals())
	}
	if s.shredSub != nil {
		_ = s.shredSub.Unsubscribe()
		s.shredSub = nil
	}
	if s.micro != nil {
		_ = s.micro.Stop()
		s.micro = nil
	}
	s.mu.Lock()
	shards := s.shards
	s.shards = nil
	s.mu.Unlock()
	mark := time.Now()
	cctx, ccancel := before(stopCloseLeft)
	cctx, ccancel2 := context.WithTimeout(cctx, stopCloseMax)
	var wg sync.WaitGroup
	errs := make([]error, len(shards))
	for i, sh := range shards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.closeAndRelease(ctx, cctx, sh)
		}()
	}
	wg.Wait()
	ccancel2()
	ccancel()
	took = append(took, "closes", time.Since(mark).Round(time.Millisecond), "closed", len(shards))
	mark = time.Now()
	s.bg.Wait() // file checks (cancelled by the closes) and corrupt shards stopping
	s.endCorrupt()
	if o := s.owner; o != nil {
		lctx, lcancel := context.WithTimeout(ctx, stopWriteMax)
		err := o.store.Leave(lctx)
		lcancel()
		if err != nil {
			s.cfg.Logger.Warn("could not leave the cluster; the membership runs out instead", "err", err)
		}
		o.store.Close()
		s.owner = nil
		took = append(took, "leave", time.Since(mark).Round(time.Millisecond))
	}
	s.cfg.Logger.Info("shardnode stopped", append(took, "took", time.Since(start).Round(time.Millisecond))...)
	return errors.Join(errs...)
}

// closeAndRelease closes a shard that stops with the node (bounded by
// cctx) and releases its lease (bounded by ctx), so that a restart, or
// anyone else, takes it at once. Under local durability a shard whose
// outbox did not reach the stream keeps its lease: acknowledged events are
// only in this node's file, and a release would let another node take the
// shard over without them, while the lease keeps it for this node's
// restart (or for a failover once it runs out, as after a crash).
func (s *Service) closeAndRelease(ctx, cctx context.Context, sh *shard) error {
	err := sh.close(cctx)
	o := s.owner
	if o == nil {
		return err
	}
	log := s.cfg.Logger.With("context", sh.cc.Name, "shard", sh.n)
	if lag := sh.store.LastSeq() - sh.relay.published.Load(); lag > 0 && sh.cc.Durability != DurabilityReplicated {
		log.Warn("the stream did not take all of the shard's events before the stop; keeping its lease for this node's restart",
			"unpublished", lag)
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, stopWriteMax)
	defer cancel()
	if _, rerr := o.store.Release(rctx, sh.lease(), ""); rerr != nil && !errors.Is(rerr, cluster.ErrConflict) {
		log.Warn("release failed; the lease runs out instead", "err", rerr)
	}
	return err
}

// drain hands every shard off to the nodes that should have them once this
// one is gone (a graceful stop), and keeps what nobody can take: it closes
// with the node. ctx bounds the hand-offs; a shard not handed off in time
// closes with the node too.
func (o *owner) drain(ctx context.Context) {
	o.mu.Lock()
	announced := o.draining // Leaving did
	o.draining = true
	o.mu.Unlock()
	if !announced {
		hctx, cancel := context.WithTimeout(ctx, min(o.cfg.Heartbeat*2, stopWriteMax))
		if err := o.heartbeat(hctx); err != nil {
			o.s.cfg.Logger.Warn("could not announce draining", "err", err)
		}
		cancel()
	}
	members := o.members()
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(o.cfg.MaxMoves, 4))
	for _, sh := range o.s.allShards() {
		// Desired skips draining members: a peer that announced its own
		// stop gets nothing.
		want := o.store.Desired(sh.cc.Name, sh.n, members)
		if want == "" || want == o.s.cfg.NodeName {
			continue // nobody to take it: it closes with the node
		}
		k := shardKey{sh.cc.Name, sh.n}
		for !o.beginMove(k, "handing off to "+want, true) {
			select { // a background move of this shard is finishing
			case <-ctx.Done():
				wg.Wait()
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
		if o.s.shardAt(k) != sh || ctx.Err() != nil || !o.store.Alive(want) {
			o.endMove(k)
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			o.handoff(ctx, sh, want, true)
		}()
	}
	wg.Wait()
}
