package shardnode

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go/micro"
)

// Version is the shardnode's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// nodeAskTimeout bounds how long a status answer waits for the other
// members' reports: a member slower than this is listed as unavailable
// rather than holding up the whole answer.
const nodeAskTimeout = 2 * time.Second

// unavailable is what status says of a member (and its shards' counts)
// that did not report in time.
const unavailable = "unavailable"

// nodeStatusSubject is where one shardnode reports on the shards it serves:
// _kuma.<ctx>.node.<node>.status. It is internal: the node answering
// kuma.<ctx>.status asks every other member there.
func nodeStatusSubject(kctx, node string) string {
	return kuma.InternalPrefix + "." + kctx + ".node." + node + ".status"
}

// nodeReport is one node's answer on its node subject: the shards it
// serves, with their counts, and what it is moving.
type nodeReport struct {
	Node   string             `json:"node"`
	Shards []kuma.ShardStatus `json:"shards"`
	Moves  []kuma.ShardMove   `json:"moves"`
}

// serveStatus registers the shardnode as the NATS micro service
// "kuma-shardnode" answering, for each context, kuma.<ctx>.status (any
// node, for the whole cluster), kuma.<ctx>.shard.migrate (any node), the
// context's shard count for routers (any node) and this node's own report
// subject.
func (s *Service) serveStatus(ctx context.Context) error {
	svc, err := natsbus.AddService(s.nc, natsbus.ServiceConfig{
		Name: "kuma-shardnode", Version: Version,
		Description: "Owns shards: SQLite files, entity actors, the outbox relay",
		QueueGroup:  "kuma-shardnode",
	})
	if err != nil {
		return fmt.Errorf("shardnode: register micro service: %w", err)
	}
	s.micro = svc
	// The handlers keep the owner of this run: Stop clears s.owner while a
	// request may still be in a handler.
	o := s.owner
	for i := range s.cfg.Contexts {
		cc := &s.cfg.Contexts[i]
		name := cc.Name
		endpoints := []struct {
			name, subject string
			answer        func(context.Context, []byte) (any, error)
		}{
			{"status-" + name, kuma.StatusSubject(name),
				func(ctx context.Context, body []byte) (any, error) {
					if err := kuma.DecodeEmpty(body); err != nil {
						return nil, err
					}
					return s.status(ctx, name, o)
				}},
			{"node-status-" + name, nodeStatusSubject(name, s.cfg.NodeName),
				func(ctx context.Context, _ []byte) (any, error) { return s.report(ctx, name, o) }},
			{"shard-count-" + name, kuma.ShardCountSubject(name),
				func(context.Context, []byte) (any, error) { return kuma.ShardCountReply{Shards: cc.Shards}, nil }},
			{"migrate-" + name, kuma.MigrateSubject(name),
				func(ctx context.Context, body []byte) (any, error) { return s.migrate(ctx, o, cc, body) }},
		}
		for _, ep := range endpoints {
			answer := ep.answer
			err := svc.AddEndpoint(ep.name, ep.subject, natsbus.JSONEndpoint{
				Answer: func(ctx context.Context, req micro.Request) (any, error) {
					return answer(ctx, req.Data())
				},
				MaxReply: natsbus.ReplyLimit(s.nc),
			})
			if err != nil {
				return fmt.Errorf("shardnode: endpoint %s: %w", ep.subject, err)
			}
		}
	}
	return natsbus.Flush(ctx, s.nc)
}

// report lists the shards of one context this node serves, with their
// counts, and the moves it has under way.
func (s *Service) report(ctx context.Context, kctx string, o *owner) (*nodeReport, error) {
	out := &nodeReport{Node: s.cfg.NodeName, Shards: []kuma.ShardStatus{}, Moves: []kuma.ShardMove{}}
	for _, sh := range s.allShards() {
		if sh.cc.Name != kctx || sh.store.Corrupt() != nil {
			continue // a corrupt one is listed below, once it is out of service
		}
		entities, _, err := sh.store.Counts(ctx)
		if err != nil {
			return nil, err
		}
		st := sh.stats()
		last, pub := st.Store.LastSeq, st.Published
		line := kuma.ShardStatus{Shard: sh.n, Owner: s.cfg.NodeName, Epoch: sh.lease().Epoch, Entities: entities,
			Events: last, RelayLag: st.RelayLag, LiveActors: st.LiveActors}
		if last > 0 {
			line.Position = kuma.Position{Shard: sh.n, Seq: last}.String()
		}
		if pub > 0 {
			line.Published = kuma.Position{Shard: sh.n, Seq: pub}.String()
		}
		out.Shards = append(out.Shards, line)
	}
	for n := range s.corruptShards(kctx) {
		out.Shards = append(out.Shards, kuma.ShardStatus{Shard: n, Owner: s.cfg.NodeName, Error: corruptStatus(s.cfg.NodeName)})
	}
	sort.Slice(out.Shards, func(i, j int) bool { return out.Shards[i].Shard < out.Shards[j].Shard })
	if o != nil {
		o.mu.Lock()
		for k, what := range o.moving {
			if k.ctx == kctx {
				out.Moves = append(out.Moves, kuma.ShardMove{Node: s.cfg.NodeName, Shard: k.n, What: what})
			}
		}
		o.mu.Unlock()
	}
	sortMoves(out.Moves)
	return out, nil
}

// Status returns the shard map of one context for the whole cluster: every
// shard's owner and epoch from the leases, where it should live and any
// pin, the live members, the moves under way, and each shard's counts as
// its owner reports them (members are asked in parallel, for at most
// nodeAskTimeout). A node that is not a member (before Start or after
// Stop) answers for the shards it serves, as a cluster of one would. Like
// Start and Stop, it must not be called while Stop runs; the status
// endpoint is safe then.
func (s *Service) Status(ctx context.Context, kctx string) (*kuma.StatusReply, error) {
	return s.status(ctx, kctx, s.owner)
}

func (s *Service) status(ctx context.Context, kctx string, o *owner) (*kuma.StatusReply, error) {
	cc := s.contextConfig(kctx)
	if cc == nil {
		return nil, kuma.Errorf(kuma.CodeNotFound, "this shardnode does not serve context %q", kctx)
	}
	self, err := s.report(ctx, kctx, o)
	if err != nil {
		return nil, err
	}
	out := &kuma.StatusReply{Context: kctx, AnsweredBy: s.cfg.NodeName, Moves: self.Moves}
	projections := make(chan []kuma.ProjectionStatus, 1)
	go func() { projections <- s.projections(ctx, kctx) }()
	if o == nil {
		out.Shards = self.Shards
		out.Nodes = []kuma.NodeStatus{{Name: s.cfg.NodeName, Shards: len(self.Shards), Started: s.started}}
		out.Projections = <-projections
		return out, nil
	}
	// Members serving other contexts on the same NATS are no part of this
	// context's cluster.
	members := cluster.ServingMembers(o.members(), kctx)
	reports, failed := s.gather(ctx, kctx, members, self)
	out.Shards = s.shardMap(o, cc, members, reports, failed)
	owned := map[string]int{}
	for _, line := range out.Shards {
		owned[line.Owner]++
	}
	out.Nodes = make([]kuma.NodeStatus, 0, len(members))
	for _, m := range members {
		started := m.Started
		if m.Node == s.cfg.NodeName && started.IsZero() {
			started = s.started
		}
		out.Nodes = append(out.Nodes, kuma.NodeStatus{Name: m.Node, Shards: owned[m.Node], Draining: m.Draining,
			Started: started.UTC(), Error: failed[m.Node]})
	}
	out.Moves = []kuma.ShardMove{}
	for _, r := range reports {
		out.Moves = append(out.Moves, r.Moves...)
	}
	sortMoves(out.Moves)
	out.Projections = <-projections
	return out, nil
}

// gather asks every other member for its report, in parallel and for at
// most nodeAskTimeout. failed names the members that did not answer.
func (s *Service) gather(ctx context.Context, kctx string, members []cluster.Member, self *nodeReport) (map[string]*nodeReport, map[string]string) {
	reports := map[string]*nodeReport{s.cfg.NodeName: self}
	failed := map[string]string{}
	ctx, cancel := context.WithTimeout(ctx, nodeAskTimeout)
	defer cancel()
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range members {
		if m.Node == s.cfg.NodeName {
			continue
		}
		wg.Add(1)
		go func(node string) {
			defer wg.Done()
			r, err := s.ask(ctx, kctx, node)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				s.cfg.Logger.Debug("status: a member did not report", "node", node, "err", err)
				failed[node] = unavailable
				return
			}
			reports[node] = r
		}(m.Node)
	}
	wg.Wait()
	return reports, failed
}

func (s *Service) ask(ctx context.Context, kctx, node string) (*nodeReport, error) {
	msg, err := s.nc.RequestWithContext(ctx, nodeStatusSubject(kctx, node), nil)
	if err != nil {
		return nil, err
	}
	if err := natsbus.ReplyError(msg); err != nil {
		return nil, err
	}
	var r nodeReport
	if err := json.Unmarshal(msg.Data, &r); err != nil {
		return nil, err
	}
	if r.Node != node {
		return nil, fmt.Errorf("node %q answered for %q", r.Node, node)
	}
	return &r, nil
}

// shardMap builds every shard's line: ownership from the lease cache,
// counts from the owner's report (or Error when the owner did not report).
func (s *Service) shardMap(o *owner, cc *ContextConfig, members []cluster.Member, reports map[string]*nodeReport, failed map[string]string) []kuma.ShardStatus {
	details := map[string]map[int]kuma.ShardStatus{}
	moving := map[int]string{}
	for node, r := range reports {
		details[node] = map[int]kuma.ShardStatus{}
		for _, line := range r.Shards {
			details[node][line.Shard] = line
		}
		for _, m := range r.Moves {
			if m.What != whatSnapshot { // an upload does not move the shard
				moving[m.Shard] = m.Node + ": " + m.What
			}
		}
	}
	out := make([]kuma.ShardStatus, 0, cc.Shards)
	for n := 0; n < cc.Shards; n++ {
		line := kuma.ShardStatus{Shard: n}
		if l, ok := o.store.Lease(cc.Name, n); ok {
			line.Owner, line.Epoch, line.HandoffTo = l.Owner, l.Epoch, l.HandoffTo
		}
		line.Desired = o.store.Desired(cc.Name, n, members)
		line.Pinned = o.store.Pin(cc.Name, n)
		if line.Owner != "" {
			if d, ok := details[line.Owner][n]; ok {
				line.Entities, line.Events, line.Position, line.Published = d.Entities, d.Events, d.Position, d.Published
				line.RelayLag, line.LiveActors, line.Error = d.RelayLag, d.LiveActors, d.Error
			} else if _, answered := reports[line.Owner]; !answered {
				line.Error = failed[line.Owner]
				if line.Error == "" {
					line.Error = unavailable // not a live member: its lease runs out, then another node takes over
				}
			}
		}
		if line.Owner == "" {
			// A corrupt shard's lease is released: its former owner's
			// report says why nobody serves it.
			for _, d := range details {
				if c, ok := d[n]; ok && c.Error != "" {
					line.Error = c.Error
				}
			}
		}
		switch {
		case moving[n] != "":
			line.Moving = moving[n]
		case line.Owner == "" && line.HandoffTo != "":
			line.Moving = "handed off to " + line.HandoffTo
		}
		out = append(out, line)
	}
	return out
}

// corruptStatus is the Error of a corrupt shard's line in status.
func corruptStatus(node string) string {
	return "corrupt on " + node + ": the operator must restore it"
}

// whatSnapshot is how the control loop names a snapshot upload in Moves
// (moves.go): the shard stays where it is.
const whatSnapshot = "uploading a snapshot"

func sortMoves(ms []kuma.ShardMove) {
	sort.Slice(ms, func(i, j int) bool {
		if ms[i].Node != ms[j].Node {
			return ms[i].Node < ms[j].Node
		}
		return ms[i].Shard < ms[j].Shard
	})
}

func (s *Service) contextConfig(kctx string) *ContextConfig {
	for i := range s.cfg.Contexts {
		if s.cfg.Contexts[i].Name == kctx {
			return &s.cfg.Contexts[i]
		}
	}
	return nil
}

// migrate pins a shard to a node, which makes the control loops move it
// there (a pin wins over rendezvous hashing), or removes the pin. It
// answers once the pin is written, with the shard's owner at that moment.
func (s *Service) migrate(ctx context.Context, o *owner, cc *ContextConfig, body []byte) (*kuma.MigrateReply, error) {
	var req kuma.MigrateRequest
	if err := kuma.Decode(body, &req); err != nil {
		return nil, err
	}
	switch {
	case req.Shard == nil:
		return nil, kuma.Errorf(kuma.CodeBadRequest, `shard is required: {"shard": N, "to": "NODE"} or {"shard": N, "unpin": true}`)
	case *req.Shard < 0 || *req.Shard >= cc.Shards:
		return nil, kuma.Errorf(kuma.CodeBadRequest, "shard %d is out of range: context %q has shards 0 to %d", *req.Shard, cc.Name, cc.Shards-1)
	case (req.To == "") == !req.Unpin:
		return nil, kuma.Errorf(kuma.CodeBadRequest, `give either "to" (a node) or "unpin": true`)
	}
	n := *req.Shard
	if o == nil {
		return nil, kuma.Errorf(kuma.CodeUnavailable, "this shardnode is not a cluster member yet; retry")
	}
	var candidates []string
	for _, m := range o.members() {
		if !m.Draining {
			candidates = append(candidates, m.Node)
		}
	}
	to := req.To
	if req.Unpin {
		to = cluster.Rendezvous(cc.Name, n, candidates)
	} else if !nodeIn(candidates, to) {
		return nil, &kuma.Error{Code: kuma.CodeNotFound,
			Message: fmt.Sprintf("node %q is not a live, non-draining member of the cluster", to),
			Details: map[string]any{"members": candidates}}
	}
	if err := o.store.SetPin(ctx, cc.Name, n, req.To); err != nil {
		s.cfg.Logger.Warn("could not write a pin", "context", cc.Name, "shard", n, "to", req.To, "err", err)
		return nil, kuma.Errorf(kuma.CodeUnavailable, "could not write the pin of shard %d; retry", n)
	}
	s.cfg.Logger.Info("shard pinned", "context", cc.Name, "shard", n, "to", req.To, "unpin", req.Unpin)
	out := &kuma.MigrateReply{Shard: n, To: to, Pinned: !req.Unpin}
	if l, ok := o.store.Lease(cc.Name, n); ok {
		out.Owner, out.Epoch = l.Owner, l.Epoch
	}
	return out, nil
}

func nodeIn(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// projections asks a projector of the context for its projections' status
// (that projector gathers every replica's, within its own deadline of 1 s
// by default); with none running (or none answering in time) the list is
// empty.
func (s *Service) projections(ctx context.Context, kctx string) []kuma.ProjectionStatus {
	ctx, cancel := context.WithTimeout(ctx, nodeAskTimeout)
	defer cancel()
	msg, err := s.nc.RequestWithContext(ctx, kuma.ProjectorStatusSubject(kctx), nil)
	if err != nil {
		return []kuma.ProjectionStatus{}
	}
	var ps []kuma.ProjectionStatus
	if natsbus.ReplyError(msg) != nil || json.Unmarshal(msg.Data, &ps) != nil || ps == nil {
		return []kuma.ProjectionStatus{}
	}
	return ps
}
