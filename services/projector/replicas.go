package projector

import (
	"context"
	"encoding/json"
	"maps"
	"sort"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
)

// Every node may run a projector replica of a context: its own durables,
// its own read models, the whole stream applied. Queries go to any one of
// them (the queue group); a query with after waits on the replica that got
// it, which is consistent because positions are the shards' own, the same
// in every replica. An admin command or a status request reaches one
// replica too, and that replica passes it to all of them on
// _kuma.<ctx>.projector.replicas.<op> (no queue group) and gathers the
// answers until every replica the stream knows (by its durables) has
// answered, or a deadline.

// replicaRequest is the body of _kuma.<ctx>.projector.replicas.<op>.
type replicaRequest struct {
	Projection string `json:"projection,omitempty"`
	Position   string `json:"position,omitempty"`
}

// replicaAnswer is one replica's answer there: always a reply (never a
// service error), so that a failure still names its node.
type replicaAnswer struct {
	Node   string          `json:"node"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *kuma.Error     `json:"error,omitempty"`
}

// replicaSet is what the stream knows of the context's replicas: per node,
// per projection, the furthest stream sequence its durables have had
// acknowledged (the live generation's: a rebuild's copy is behind it).
type replicaSet struct {
	last  uint64
	nodes map[string]map[string]uint64
}

// knownReplicas reads the replicas from the durables on the stream. A
// replica that stopped for good keeps its durables, and so is reported as
// missing, until an operator deletes them (docs/cluster.md).
func (s *Service) knownReplicas(ctx context.Context) (*replicaSet, error) {
	st, err := s.stream(ctx)
	if err != nil {
		return nil, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, err
	}
	rs := &replicaSet{last: info.State.LastSeq, nodes: map[string]map[string]uint64{}}
	list := st.ListConsumers(ctx)
	for ci := range list.Info() {
		node, name := ci.Config.Metadata[consumerMetaNode], ci.Config.Metadata[consumerMetaProjection]
		if node == "" || name == "" {
			continue
		}
		if rs.nodes[node] == nil {
			rs.nodes[node] = map[string]uint64{}
		}
		rs.nodes[node][name] = max(rs.nodes[node][name], ci.AckFloor.Stream)
	}
	if err := list.Err(); err != nil {
		// Typically the listing waited for a durable whose server is
		// down and ran out of time: what was listed, and the replicas
		// remembered, are still what is known.
		s.log.Debug("projector durables not all listed; using the replicas remembered", "err", err)
	}
	s.rememberReplicas(rs)
	return rs, nil
}

// rememberReplicasFor is how long a replica the durables named stays known
// once they no longer name it.
const rememberReplicasFor = 10 * time.Minute

// seenReplica is a replica as the durables last named it.
type seenReplica struct {
	applied map[string]uint64 // by projection
	at      time.Time
}

// rememberReplicas adds to rs the replicas the durables named in the last
// rememberReplicasFor but name no longer, and remembers those rs names.
// Why: a durable has one replica (consumer.go), and when it lives on the
// NATS server of the node that died, it is not listed while that server is
// down. The dead replica vanished from status instead of showing as
// unavailable, the one thing an operator needs to see then.
func (s *Service) rememberReplicas(rs *replicaSet) {
	now := s.cfg.Now()
	s.replicasMu.Lock()
	defer s.replicasMu.Unlock()
	for node, applied := range rs.nodes {
		s.replicasSeen[node] = seenReplica{applied: maps.Clone(applied), at: now}
	}
	for node, seen := range s.replicasSeen {
		switch {
		case now.Sub(seen.at) > rememberReplicasFor:
			delete(s.replicasSeen, node)
		case rs.nodes[node] == nil:
			rs.nodes[node] = maps.Clone(seen.applied)
		}
	}
}

// fanOut sends op to every replica, this one included, and gathers their
// answers in node order. missing lists the replicas the stream knows that
// did not answer within wait. Without the list of known replicas (the
// stream could not be read) it waits the whole of wait, since it cannot
// tell when every replica has answered.
func (s *Service) fanOut(ctx context.Context, op string, req replicaRequest, wait time.Duration) (answers []replicaAnswer, missing []string, known *replicaSet) {
	gctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	// The listing gets half the time: with the stream's leader gone it
	// would take all of it, and the answers are what matters.
	kctx, kcancel := context.WithTimeout(gctx, wait/2)
	known, err := s.knownReplicas(kctx)
	kcancel()
	if err != nil {
		s.log.Warn("projector replicas unknown; waiting the whole deadline for their answers", "op", op, "err", err)
	}
	body, _ := json.Marshal(req)
	msg := &nats.Msg{Subject: kuma.ProjectorReplicasSubject(s.cfg.Context, op), Data: body, Header: nats.Header{}}
	telemetry.Inject(ctx, msg.Header)
	seen := map[string]bool{}
	decoded := 0
	enough := func(got []*nats.Msg) bool {
		for ; decoded < len(got); decoded++ {
			var a replicaAnswer
			if json.Unmarshal(got[decoded].Data, &a) != nil || a.Node == "" || seen[a.Node] {
				continue
			}
			seen[a.Node] = true
			answers = append(answers, a)
		}
		if known == nil || !seen[s.cfg.NodeName] {
			return false
		}
		for n := range known.nodes {
			if !seen[n] {
				return false
			}
		}
		return true
	}
	if _, err := natsbus.Gather(gctx, s.nc, msg, enough); err != nil {
		s.log.Warn("projector replicas not reached", "op", op, "err", err)
	}
	if known != nil {
		for n := range known.nodes {
			if !seen[n] {
				missing = append(missing, n)
			}
		}
	}
	sort.Slice(answers, func(i, j int) bool { return answers[i].Node < answers[j].Node })
	sort.Strings(missing)
	return answers, missing, known
}

// replicaOp runs op on this replica alone: the handler of the replicas
// subjects.
func (s *Service) replicaOp(ctx context.Context, op string, req *replicaRequest) replicaAnswer {
	var out any
	var err error
	switch op {
	case "rebuild":
		out, err = s.Rebuild(ctx, req.Projection)
	case "retry":
		err = s.Retry(req.Projection)
	case "skip":
		err = s.Skip(req.Projection, req.Position)
	case "drop":
		out, err = s.Drop(ctx, req.Projection)
	case "status":
		out, err = s.Status(ctx)
	default:
		err = kuma.Errorf(kuma.CodeBadRequest, "no replica operation %q", op)
	}
	a := replicaAnswer{Node: s.cfg.NodeName}
	if err != nil {
		a.Error = kuma.AsError(err)
		return a
	}
	if out != nil {
		if a.Result, err = json.Marshal(out); err != nil {
			a.Error = kuma.AsError(err)
		}
	}
	return a
}

// adminAll passes an admin command to every replica and combines their
// answers. The command succeeds when at least one replica applied it; it
// fails with the error of this replica (else of the first one) when none
// did, as it did with a single projector. fanout says who did what.
func (s *Service) adminAll(ctx context.Context, op string, req replicaRequest) (*adminOutcome, error) {
	answers, missing, _ := s.fanOut(ctx, op, req, s.cfg.ReplicaAdminWait)
	out := &adminOutcome{Fanout: kuma.ReplicaFanout{Missing: missing}}
	var firstErr, ownErr error
	for _, a := range answers {
		r := kuma.ReplicaResult{Node: a.Node, Applied: a.Error == nil, Error: a.Error}
		if a.Error != nil {
			if firstErr == nil {
				firstErr = a.Error
			}
			if a.Node == s.cfg.NodeName {
				ownErr = a.Error
			}
		}
		if op == "rebuild" && a.Error == nil {
			var rr kuma.RebuildReply
			if err := json.Unmarshal(a.Result, &rr); err == nil {
				started := rr.Started
				r.Generation, r.Started = rr.Generation, &started
				if out.Rebuild == nil || a.Node == s.cfg.NodeName {
					out.Rebuild = &rr
				}
			}
		}
		if op == "drop" && a.Error == nil {
			r.Removed = dropResult(a.Result)
		}
		out.Fanout.Replicas = append(out.Fanout.Replicas, r)
		if r.Applied {
			out.Applied++
		}
	}
	if out.Applied == 0 {
		switch {
		case ownErr != nil:
			return nil, ownErr
		case firstErr != nil:
			return nil, firstErr
		}
		return nil, kuma.Errorf(kuma.CodeUnavailable, "no projector replica of context %q answered %s in time; retry", s.cfg.Context, op)
	}
	return out, nil
}

// adminOutcome is the combined outcome of an admin command on every
// replica: Rebuild is the rebuild reply of this replica (or the first
// replica that started one), Applied how many replicas applied it.
type adminOutcome struct {
	Rebuild *kuma.RebuildReply
	Applied int
	Fanout  kuma.ReplicaFanout
}

// RebuildAll starts a rebuild of one projection on every live replica.
func (s *Service) RebuildAll(ctx context.Context, name string) (*kuma.RebuildReply, error) {
	if _, err := s.projection(name); err != nil {
		return nil, err
	}
	r, err := s.adminAll(ctx, "rebuild", replicaRequest{Projection: name})
	if err != nil {
		return nil, err
	}
	out := kuma.RebuildReply{Projection: name}
	if r.Rebuild != nil {
		out = *r.Rebuild
	}
	out.ReplicaFanout = r.Fanout
	return &out, nil
}

// RetryAll makes every replica stopped at a failed event of the projection
// try it again.
func (s *Service) RetryAll(ctx context.Context, name string) (*kuma.ProjectionActReply, error) {
	if _, err := s.projection(name); err != nil {
		return nil, err
	}
	r, err := s.adminAll(ctx, "retry", replicaRequest{Projection: name})
	if err != nil {
		return nil, err
	}
	return &kuma.ProjectionActReply{Projection: name, Retrying: true, ReplicaFanout: r.Fanout}, nil
}

// SkipAll makes every replica stopped at the event at position skip it.
func (s *Service) SkipAll(ctx context.Context, name, position string) (*kuma.ProjectionActReply, error) {
	if _, err := s.projection(name); err != nil {
		return nil, err
	}
	r, err := s.adminAll(ctx, "skip", replicaRequest{Projection: name, Position: position})
	if err != nil {
		return nil, err
	}
	return &kuma.ProjectionActReply{Projection: name, Skipped: position, ReplicaFanout: r.Fanout}, nil
}

// StatusAll reports every projection as every replica sees it: per
// projection, the worst replica's status with every replica's in Replicas,
// those that did not answer included as "unavailable".
func (s *Service) StatusAll(ctx context.Context) ([]kuma.ProjectionStatus, error) {
	answers, missing, known := s.fanOut(ctx, "status", replicaRequest{}, s.cfg.ReplicaStatusWait)
	byName := map[string][]kuma.ProjectionStatus{}
	for _, a := range answers {
		var ps []kuma.ProjectionStatus
		if a.Error != nil || json.Unmarshal(a.Result, &ps) != nil {
			// It answered, but not with a status: listed as missing.
			missing = append(missing, a.Node)
			continue
		}
		for _, p := range ps {
			p.Node = a.Node
			byName[p.Name] = append(byName[p.Name], p)
		}
	}
	var unanswered []kuma.ProjectionStatus
	if known != nil {
		for _, n := range missing {
			for name, seq := range known.nodes[n] {
				p := kuma.ProjectionStatus{Name: name, Node: n, State: unavailable, Applied: seq, Positions: map[string]string{}}
				if known.last > seq {
					p.Lag = int64(known.last - seq)
				}
				unanswered = append(unanswered, p)
			}
		}
	}
	if len(answers) == 0 {
		// Not even this replica answered in time (it is busy stopping,
		// say): its own view is better than nothing.
		own, err := s.Status(ctx)
		if err != nil {
			return nil, err
		}
		for _, p := range own {
			byName[p.Name] = append(byName[p.Name], p)
		}
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make([]kuma.ProjectionStatus, 0, len(names))
	for _, name := range names {
		live := byName[name]
		sort.SliceStable(live, func(i, j int) bool { return worse(live[i], live[j]) })
		top := live[0]
		replicas := append([]kuma.ProjectionStatus(nil), live...)
		for _, u := range unanswered {
			if u.Name == name {
				replicas = append(replicas, u)
			}
		}
		sort.Slice(replicas, func(i, j int) bool { return replicas[i].Node < replicas[j].Node })
		top.Replicas = replicas
		out = append(out, top)
	}
	return out, nil
}

// unavailable is the state status gives a replica the stream knows that
// did not answer (the shardnode says the same of a member).
const unavailable = "unavailable"

// worse orders replica statuses from the one a query should fear most: a
// live copy stopped at an event, a rebuild stopped, a live copy retrying,
// a rebuild under way (least progress first), then the largest lag.
func worse(a, b kuma.ProjectionStatus) bool {
	if sa, sb := severity(a), severity(b); sa != sb {
		return sa > sb
	}
	if a.Rebuild != nil && b.Rebuild != nil && a.Rebuild.Progress != b.Rebuild.Progress {
		return a.Rebuild.Progress < b.Rebuild.Progress
	}
	if a.Lag != b.Lag {
		return a.Lag > b.Lag
	}
	return a.Node < b.Node
}

func severity(p kuma.ProjectionStatus) int {
	switch {
	case p.State == "stopped":
		return 4
	case p.Rebuild != nil && p.Rebuild.State == "stopped":
		return 3
	case p.State == "retrying":
		return 2
	case p.Rebuild != nil:
		return 1
	}
	return 0
}
