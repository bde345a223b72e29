package shardnode

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go/micro"
)

// Version is the shardnode's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// serveStatus registers the shardnode as the NATS micro service
// "kuma-shardnode" answering kuma.<ctx>.status for each context. With one
// node it is the whole shard map; a cluster's map is the union of its nodes'
// answers.
func (s *Service) serveStatus(ctx context.Context) error {
	svc, err := micro.AddService(s.nc, micro.Config{
		Name: "kuma-shardnode", Version: Version,
		Description: "Owns shards: SQLite files, entity actors, the outbox relay",
		QueueGroup:  "kuma-shardnode",
	})
	if err != nil {
		return fmt.Errorf("shardnode: register micro service: %w", err)
	}
	s.micro = svc
	for _, cc := range s.cfg.Contexts {
		name := cc.Name
		err := svc.AddEndpoint("status-"+name, micro.HandlerFunc(func(req micro.Request) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			st, err := s.Status(ctx, name)
			if err != nil {
				_ = natsbus.MicroError(req, err)
				return
			}
			_ = req.RespondJSON(st)
		}), micro.WithEndpointSubject(kuma.PublicPrefix+"."+name+".status"))
		if err != nil {
			return fmt.Errorf("shardnode: status endpoint: %w", err)
		}
	}
	return natsbus.Flush(ctx, s.nc)
}

// Status returns the shard map of one context as this node sees it.
func (s *Service) Status(ctx context.Context, kctx string) (*kuma.StatusReply, error) {
	s.mu.Lock()
	shards := append([]*shard(nil), s.shards...)
	s.mu.Unlock()
	out := &kuma.StatusReply{Context: kctx, Shards: []kuma.ShardStatus{}, Projections: []kuma.ProjectionStatus{}}
	for _, sh := range shards {
		if sh.cc.Name != kctx {
			continue
		}
		entities, _, err := sh.store.Counts(ctx)
		if err != nil {
			return nil, err
		}
		st := sh.stats()
		last, pub := st.Store.LastSeq, st.Published
		line := kuma.ShardStatus{Shard: sh.n, Owner: s.cfg.NodeName, Entities: entities, Events: last,
			RelayLag: st.RelayLag, LiveActors: st.LiveActors}
		if last > 0 {
			line.Position = kuma.Position{Shard: sh.n, Seq: last}.String()
		}
		if pub > 0 {
			line.Published = kuma.Position{Shard: sh.n, Seq: pub}.String()
		}
		out.Shards = append(out.Shards, line)
	}
	out.Nodes = []kuma.NodeStatus{{Name: s.cfg.NodeName, Shards: len(out.Shards)}}
	out.Projections = s.projections(ctx, kctx)
	return out, nil
}

// projections asks a projector of the context for its projections' status;
// with none running (or none answering quickly) the list is empty.
func (s *Service) projections(ctx context.Context, kctx string) []kuma.ProjectionStatus {
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
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
