package shardnode

import (
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// ShardQueue is the queue group of every shard subscription.
const ShardQueue = "kuma-shard"

// A hand-off must not lose a request. Between the old owner unsubscribing
// and the new one subscribing nobody listens: NATS answers a request sent
// then with no responders, which the router retries. But a server learns
// of a subscription's end from its peers a moment late, and a message it
// forwards to a server whose subscriber just left is dropped there without
// a word: the client waits out its timeout.
//
// So the old owner does not leave the shard's queue group when it stops
// serving. It swaps its serving member for a refusing one, which answers
// every request unavailable at once, having done nothing (the router sends
// it again a few milliseconds later), and keeps it until the new owner has
// marked its lease Serving and a grace period has passed. While both are
// members NATS gives each message to one of them, never both, so a refused
// request is safe to send again; and a message that reaches a server whose
// member has left is passed on to another member of the group.
const (
	// refuseGrace is how long a refusing member stays once the new owner
	// serves: time for every server to learn of the new member.
	refuseGrace = time.Second
	// refuseMax bounds a refusal whose new owner never comes to serve.
	refuseMax = 2 * time.Minute
)

type refusal struct {
	sub     *nats.Subscription
	to      string    // the node the shard was handed to
	epoch   int64     // the lease epoch the shard was handed off under
	since   time.Time // when the refusal began
	serving time.Time // when the new owner was first seen serving
}

// refuse makes this node answer the shard's requests unavailable until the
// next owner serves them; call it before the serving member leaves.
func (o *owner) refuse(sh *shard, to string) {
	k := shardKey{sh.cc.Name, sh.n}
	nc := o.s.nc
	sub, err := nc.QueueSubscribe(kuma.ShardPrefix(sh.cc.Name, sh.n)+">", ShardQueue, func(m *nats.Msg) {
		if !kuma.ReplyAllowed(m.Reply) {
			return
		}
		_ = natsbus.RespondError(nc, m, kuma.Errorf(kuma.CodeUnavailable,
			"shard %d of %q is moving to another node; retry", sh.n, sh.cc.Name))
	})
	if err != nil {
		o.s.cfg.Logger.Warn("could not keep refusing the shard's requests during its hand-off", "shard", sh.n, "err", err)
		return
	}
	o.mu.Lock()
	if old := o.refusing[k]; old != nil {
		_ = old.sub.Drain()
	}
	o.refusing[k] = &refusal{sub: sub, to: to, epoch: sh.lease().Epoch, since: time.Now()}
	o.mu.Unlock()
}

// unrefuse ends a refusal (this node serves the shard again).
func (o *owner) unrefuse(k shardKey) {
	o.mu.Lock()
	r := o.refusing[k]
	delete(o.refusing, k)
	o.mu.Unlock()
	if r != nil {
		_ = r.sub.Drain()
	}
}

// endRefusals ends the refusals whose new owner has served for refuseGrace,
// or that have lasted refuseMax. It runs on every tick.
func (o *owner) endRefusals() {
	now := time.Now()
	o.mu.Lock()
	var done []*nats.Subscription
	for k, r := range o.refusing {
		l, ok := o.store.Lease(k.ctx, k.n)
		if ok && l.Serving && l.Epoch > r.epoch && l.Owner != o.s.cfg.NodeName && r.serving.IsZero() {
			r.serving = now
		}
		if !r.serving.IsZero() && now.Sub(r.serving) >= refuseGrace || now.Sub(r.since) >= refuseMax {
			done = append(done, r.sub)
			delete(o.refusing, k)
		}
	}
	o.mu.Unlock()
	for _, sub := range done {
		// Drain, not Unsubscribe: a message already on its way to this
		// member is still refused (and so sent again), not dropped.
		_ = sub.Drain()
	}
}

// abandonRefusals ends the refusals of shards handed to a node that is
// leaving too (draining, or no longer a member) and not yet serving them:
// it takes no shard any more, so it never will, and waiting for it would
// only hold this node's stop up. It returns how many refusals remain.
func (o *owner) abandonRefusals() int {
	staying := map[string]bool{}
	for _, m := range o.store.Members() {
		if !m.Draining {
			staying[m.Node] = true
		}
	}
	o.mu.Lock()
	var done []*nats.Subscription
	for k, r := range o.refusing {
		if r.serving.IsZero() && !staying[r.to] {
			done = append(done, r.sub)
			delete(o.refusing, k)
		}
	}
	left := len(o.refusing)
	o.mu.Unlock()
	for _, sub := range done {
		_ = sub.Drain()
	}
	return left
}

// refusals counts the shards this node still refuses.
func (o *owner) refusals() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.refusing)
}
