package shardnode

import (
	"context"
	"fmt"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/services/shardnode/entity"
	"github.com/nats-io/nats.go"
)

func (sh *shard) subscribe() error {
	// A queue subscription, though one node serves a shard: during a hand-off
	// the old owner keeps a refusing member in the group (refuse.go), and
	// NATS passes a message that reaches a server whose member just left
	// on to another member, where a plain subscription's would be dropped.
	sub, err := sh.nc.QueueSubscribe(kuma.ShardPrefix(sh.cc.Name, sh.n)+">", ShardQueue, sh.onMsg)
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
		sh.metrics.requests.WithLabelValues("unknown", string(kuma.CodeForbidden)).Inc()
		sh.logger.Debug("request dropped: its reply subject is in a reserved namespace", "reply", msg.Reply)
		return
	}
	if msg.Subject == kuma.ShardFeedSubject(sh.cc.Name, sh.n) {
		select {
		case sh.feedSlots <- struct{}{}:
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
	if err := sh.dispatch(entity, sh.request(op, msg)); err != nil {
		sh.replyError(msg, err)
	}
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
	sh.metrics.requests.WithLabelValues(op, string(kuma.ErrorCode(err))).Inc()
	if rerr := natsbus.RespondError(sh.nc, msg, err); rerr != nil {
		sh.metrics.replyFailed(op, rerr)
		sh.logger.Warn("reply failed", "subject", msg.Subject, "err", rerr)
	}
}

// request is msg decoded for an actor: its answer goes back to msg's reply
// subject. A request lives no longer than the shard's patience (gone).
func (sh *shard) request(op string, msg *nats.Msg) *entity.Request {
	req := &entity.Request{Op: op, Body: msg.Data, Ctx: telemetry.Extract(sh.gone, msg.Header)}
	if op == kuma.OpForget && msg.Header != nil {
		req.RequestedBy = msg.Header.Get(kuma.HeaderRequestedBy)
	}
	req.Reply = func(_ context.Context, body []byte, err error) {
		nc := sh.nc
		if err != nil {
			err = natsbus.RespondError(nc, msg, err)
		} else {
			err = natsbus.RespondBody(nc, msg, body)
		}
		if err != nil {
			sh.metrics.replyFailed(op, err)
			// The shard, not the id: logs outlive a forget.
			sh.logger.Warn("reply failed", "shard", sh.n, "op", op, "err", err)
		}
	}
	return req
}
