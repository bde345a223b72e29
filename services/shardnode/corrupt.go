package shardnode

import (
	"context"
	"slices"
	"strconv"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go"
)

// A damaged shard file (SQLite's SQLITE_CORRUPT or SQLITE_NOTADB on any read
// or write, a failed quick_check, or a file that lacks events the stream
// has) is not served again by this node: retrying cannot bring the data
// back, and writing more into a broken b-tree can spread the damage. The
// shard is taken out of service once, with one ERROR log line and
// kuma_shard_corrupt{context,shard} = 1, its lease is released, and a
// member of its queue group answers every request internal, at once, so
// that clients do not wait out their timeouts. Other shards go on. The
// operator restores the file (see the log line); the node's next start
// opens it again.
//
// A full disk is not damage: the failed write stored nothing, and the same
// write succeeds once space is freed, so the shard keeps serving. Its
// refused writes answer internal too ("a failed disk"), not unavailable,
// which clients retry by themselves until their deadline.

// corruptShard is a shard this node stopped serving because its file is
// damaged.
type corruptShard struct {
	cause error
	sub   *nats.Subscription // answers the shard's requests; nil if it could not subscribe
}

// corruptError is the reply to every request for a corrupt shard's entities.
// It names the shard, never the file or the SQLite error.
func corruptError(kctx string, n int) error {
	return kuma.Errorf(kuma.CodeInternal, "shard %d of %q is corrupt; the operator must restore it", n, kctx)
}

// movingOffCorruptError is the reply for a corrupt shard while another
// member can take it: clients retry unavailable by themselves, and the
// shard is served again once that member has taken it.
func movingOffCorruptError(kctx string, n int) error {
	return kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q is moving off a node whose copy is damaged; retry", n, kctx)
}

// corruptAnswer is what this node answers for a shard it holds as corrupt:
// unavailable while placement has another member for it (it is being taken
// there), internal when none is left to take it.
func (s *Service) corruptAnswer(kctx string, n int) error {
	if o := s.owner; o != nil {
		if want := o.store.Desired(kctx, n, o.members()); want != "" && want != s.cfg.NodeName {
			return movingOffCorruptError(kctx, n)
		}
	}
	return corruptError(kctx, n)
}

// refusedShards names the shards this node holds as corrupt, for its member
// record: placement gives them to other members (cluster.Member.Refuses).
func (s *Service) refusedShards() []string {
	s.corruptMu.Lock()
	defer s.corruptMu.Unlock()
	var out []string
	for k := range s.corrupt {
		out = append(out, cluster.ShardName(k.ctx, k.n))
	}
	slices.Sort(out)
	return out
}

// quietCorrupt stops answering for corrupt shard k: another node serves it
// now, and an answer from here would fail the requests that share its
// queue group with the new owner's. The shard stays refused.
func (s *Service) quietCorrupt(k shardKey) {
	s.corruptMu.Lock()
	defer s.corruptMu.Unlock()
	if c := s.corrupt[k]; c != nil && c.sub != nil {
		_ = c.sub.Drain()
		c.sub = nil
		s.cfg.Logger.Info("another node serves the corrupt shard now; this node stops answering for it", "context", k.ctx, "shard", k.n)
	}
}

// diskFullError is the reply to a write the disk had no room for.
func diskFullError(kctx string, n int) error {
	return kuma.Errorf(kuma.CodeInternal, "shard %d of %q: the disk is full; nothing was stored (retry once space is freed)", n, kctx)
}

// isCorrupt tells whether this node took the shard out of service as corrupt.
func (s *Service) isCorrupt(k shardKey) bool {
	s.corruptMu.Lock()
	defer s.corruptMu.Unlock()
	return s.corrupt[k] != nil
}

// corruptShards lists the corrupt shards of context kctx and their causes.
func (s *Service) corruptShards(kctx string) map[int]error {
	s.corruptMu.Lock()
	defer s.corruptMu.Unlock()
	out := map[int]error{}
	for k, c := range s.corrupt {
		if k.ctx == kctx {
			out[k.n] = c.cause
		}
	}
	return out
}

// shardCorrupt takes a shard out of service because its file is damaged.
// The first call for a shard logs, counts and answers for it; every call
// retires it if it is served. It may come from any goroutine (a shard's
// OnCorrupt, an actor, the control loop) and does not block: the shard
// stops in the background.
//
// It returns what the node answers for the shard from then on
// (corruptAnswer): unavailable while another member takes it, internal
// when none can.
func (s *Service) shardCorrupt(kctx string, n int, cause error) error {
	k := shardKey{kctx, n}
	s.corruptMu.Lock()
	if s.corrupt[k] != nil {
		s.corruptMu.Unlock()
		s.retireCorrupt(k)
		return s.corruptAnswer(kctx, n)
	}
	c := &corruptShard{cause: cause}
	s.corrupt[k] = c
	s.corruptMu.Unlock()
	s.cfg.Logger.Error("shard file is corrupt: the shard stops serving, and answers internal, until an operator restores it "+
		"(stop the node, move the shard file and its -wal aside, start it: the shard is rebuilt from its uploaded snapshot, if any, and the event stream)",
		"context", kctx, "shard", n, "err", cause)
	s.metrics.corrupt.WithLabelValues(kctx, strconv.Itoa(n)).Set(1)

	// The answering member joins the queue group before the serving one
	// leaves, so that no request finds nobody (see refuse.go).
	nc := s.nc
	sub, err := nc.QueueSubscribe(kuma.ShardPrefix(kctx, n)+">", ShardQueue, func(m *nats.Msg) {
		if !kuma.ReplyAllowed(m.Reply) {
			return
		}
		op, _, ok := kuma.ParseShardSubject(m.Subject)
		if !ok || !knownOp(op) {
			op = "unknown"
		}
		answer := s.corruptAnswer(kctx, n)
		s.metrics.requests.WithLabelValues(op, string(kuma.ErrorCode(answer))).Inc()
		_ = natsbus.RespondError(nc, m, answer)
	})
	if err != nil {
		s.cfg.Logger.Warn("could not answer the corrupt shard's requests; they find no responder instead", "context", kctx, "shard", n, "err", err)
	} else {
		s.corruptMu.Lock()
		c.sub = sub
		s.corruptMu.Unlock()
	}

	s.retireCorrupt(k)
	return s.corruptAnswer(kctx, n)
}

// retireCorrupt stops serving shard k, if this node serves it, in the
// background, and releases its lease. It is a no-op for a shard not (or no
// longer) served: take, which marks a shard served only after opening it,
// calls it again once it has.
func (s *Service) retireCorrupt(k shardKey) {
	sh := s.shardAt(k)
	if sh == nil || !s.removeShard(sh) {
		return
	}
	kctx, n := k.ctx, k.n
	o := s.owner
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		sh.stopServing(ctx)
		if err := sh.store.Close(); err != nil {
			s.cfg.Logger.Warn("close of the corrupt shard", "context", kctx, "shard", n, "err", err)
		}
		if o != nil {
			if _, err := o.store.Release(ctx, sh.lease(), ""); err != nil {
				s.cfg.Logger.Warn("release of the corrupt shard failed; its lease runs out instead", "context", kctx, "shard", n, "err", err)
			}
		}
	}()
}

// endCorrupt stops answering for corrupt shards (the node is stopping).
func (s *Service) endCorrupt() {
	s.corruptMu.Lock()
	defer s.corruptMu.Unlock()
	for _, c := range s.corrupt {
		if c.sub != nil {
			_ = c.sub.Drain()
			c.sub = nil
		}
	}
}

// checkInBackground runs quick_check over a shard's file once it serves
// (sqlite.Shard.Check; about 0.4 s per 100 MB), one shard at a time per
// node so that a start with many large shards does not starve the requests.
// A damaged file takes the shard out of service through its OnCorrupt.
func (s *Service) checkInBackground(sh *shard) {
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		select {
		case s.checkSem <- struct{}{}:
		case <-sh.checkCtx.Done():
			return
		}
		defer func() { <-s.checkSem }()
		start := time.Now()
		err := sh.store.Check(sh.checkCtx)
		switch {
		case err == nil:
			s.cfg.Logger.Debug("shard file checked", "context", sh.cc.Name, "shard", sh.n, "took", time.Since(start).Round(time.Millisecond))
		case sh.checkCtx.Err() != nil, sqlite.IsCorrupt(err):
			// Stopped serving first, or OnCorrupt took it out of service.
		default:
			s.cfg.Logger.Warn("shard file check could not run", "context", sh.cc.Name, "shard", sh.n, "err", err)
		}
	}()
}

// storageError turns what the shard file said into the protocol's answer:
// a damaged file takes the shard out of service and answers corrupt; a full
// disk answers disk full. reported is true when the error was logged here,
// so that the caller does not log every such request again.
func (sh *shard) storageError(err error) (out error, reported bool) {
	switch {
	case err == nil:
		return nil, false
	case sqlite.IsCorrupt(err):
		answer := sh.corrupt(sh.cc.Name, sh.n, err)
		if !sh.damaged.Swap(true) {
			// The request that found the damage: internal, as a failed
			// disk would be.
			return corruptError(sh.cc.Name, sh.n), true
		}
		// A request that still reached the shard after that (queued in
		// an actor, or come before its subscription was drained) gets
		// what the node answers for the shard now: unavailable while
		// another member takes it, so that the client retries and is
		// served there (before, internal: TestCorruptShardMovesToAnotherNode
		// failed on it, in CI and in 4 of 72 runs under load).
		return answer, true
	case sqlite.IsFull(err):
		sh.metrics.diskFull.Inc()
		if sh.full.CompareAndSwap(false, true) {
			sh.logger.Error("the disk is full: writes to the shard are refused until space is freed (reads go on)",
				"context", sh.cc.Name, "shard", sh.n, "err", err)
		}
		return diskFullError(sh.cc.Name, sh.n), true
	}
	return err, false
}

// wrote notes a successful write: the end of a full disk, if there was one.
func (sh *shard) wrote() {
	if sh.full.Load() && sh.full.CompareAndSwap(true, false) {
		sh.logger.Info("the shard writes again: space was freed", "context", sh.cc.Name, "shard", sh.n)
	}
}
