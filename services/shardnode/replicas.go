package shardnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go/jetstream"
)

// Replicas follow the cluster's size, upwards only. A shardnode counts the
// JetStream servers of its NATS cluster at start and then every
// replicasEvery, and raises the replicas of the context streams, the
// members and leases buckets and the snapshot store to natsbus.Replicas of
// that count (3 from three servers on) when they have fewer.
//
// It never lowers them. A count that drops is most often a server that is
// down or cut off for a while, and a stream scaled down then would stay
// less replicated once the server is back, at the moment its data matters
// most. An operator who shrinks the cluster for good scales the streams
// down by hand (nats stream edit --replicas). ClusterConfig.Replicas is the
// minimum.

// replicasEvery is how often a running node looks at the cluster's size.
const replicasEvery = 10 * time.Second

// peersTimeout bounds one count of the JetStream servers: servers answer at
// once, and a user the NATS permissions do not let ask gets no answer at
// all, which must not hold up a start.
const peersTimeout = 2 * time.Second

// replicatedStreams names the JetStream streams whose replicas follow the
// cluster: each context's event stream and the streams behind the cluster
// buckets (a KV bucket B is stream KV_B, an object store O is OBJ_O), the
// keyvault's bucket included (the keyvault creates it with the replicas
// the cluster has then, and relies on this to raise it later). They
// are raised through the streams themselves, which keeps every other
// setting of the bucket as it is.
func (s *Service) replicatedStreams() []string {
	names := make([]string, 0, len(s.cfg.Contexts)+4)
	for _, cc := range s.cfg.Contexts {
		names = append(names, kuma.StreamName(cc.Name))
	}
	return append(names, "KV_"+cluster.MembersBucket, "KV_"+cluster.LeasesBucket, "OBJ_"+cluster.SnapshotsBucket, "KV_"+cluster.KeysBucket)
}

// replicaFloor is the replica count Start creates or updates the streams
// and buckets with: the configured minimum, or the highest count one of
// them has already, so that a node starting in a cluster that raised them
// never sets them back. (A bucket left lower than the others by an
// interrupted raise is brought up to the others here, unlogged.)
func (s *Service) replicaFloor(ctx context.Context) (int, error) {
	floor := s.cfg.Cluster.Replicas
	for _, name := range s.replicatedStreams() {
		st, err := s.js.Stream(ctx, name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("shardnode: stream %s: %w", name, err)
		}
		floor = max(floor, st.CachedInfo().Config.Replicas)
	}
	return floor, nil
}

// clusterReplicas is the replica count the cluster's JetStream servers that
// are up allow now (natsbus.Replicas), at least the configured minimum. A
// server outside any cluster allows only one; no answer (the NATS
// permissions may forbid the question) counts as the minimum.
func (s *Service) clusterReplicas(ctx context.Context) (int, error) {
	if s.nc.ConnectedClusterName() == "" {
		return s.cfg.Cluster.Replicas, nil
	}
	pctx, cancel := context.WithTimeout(ctx, peersTimeout)
	defer cancel()
	peers, err := natsbus.JetStreamPeers(pctx, s.nc)
	if err != nil {
		return s.cfg.Cluster.Replicas, err
	}
	return max(s.cfg.Cluster.Replicas, natsbus.Replicas(peers)), nil
}

// raiseReplicas counts the cluster's JetStream servers and raises every
// replicated stream that has fewer replicas than they allow; it lowers
// none. Several nodes may raise the same stream at once: each asks for
// the same count, and a loser tries again on its next round.
func (s *Service) raiseReplicas(ctx context.Context) ([]string, error) {
	want, err := s.clusterReplicas(ctx)
	if err != nil {
		return nil, fmt.Errorf("shardnode: count the cluster's JetStream servers: %w", err)
	}
	var raised []string
	var errs []error
	for _, name := range s.replicatedStreams() {
		st, err := s.js.Stream(ctx, name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue // not created yet: it is created with the floor
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("shardnode: stream %s: %w", name, err))
			continue
		}
		cfg := st.CachedInfo().Config
		if cfg.Replicas >= want {
			continue // never lowered: see the top of this file
		}
		from := cfg.Replicas
		cfg.Replicas = want
		if _, err := s.js.UpdateStream(ctx, cfg); err != nil {
			errs = append(errs, fmt.Errorf("shardnode: raise the replicas of stream %s from %d to %d: %w", name, from, want, err))
			continue
		}
		s.cfg.Logger.Info("raised the replicas of a stream to follow the cluster", "stream", name, "from", from, "to", want)
		raised = append(raised, name)
	}
	return raised, errors.Join(errs...)
}

// convergeTimeout bounds how long Start waits for the streams it raised to
// reach their new replicas.
const convergeTimeout = 30 * time.Second

// raiseAtStart raises the replicas as a round of followReplicas would, and
// waits (at most convergeTimeout) until the raised streams have converged:
// while a stream converges NATS places no consumer of its full replica
// count on it (error 10023, insufficient resources), and the projector of
// this process creates its consumers right after the shardnode starts.
// Consumers created elsewhere during a raise may still meet that error.
func (s *Service) raiseAtStart(ctx context.Context) error {
	raised, err := s.raiseReplicas(ctx)
	if len(raised) == 0 {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, convergeTimeout)
	defer cancel()
	for _, name := range raised {
		if werr := s.waitConverged(wctx, name); werr != nil {
			return errors.Join(err, werr)
		}
	}
	return err
}

// waitConverged polls a stream's info until it has a leader and is not
// converging to a new peer set (the server's "desired" placement, which
// the jetstream package does not decode, hence the raw API request).
func (s *Service) waitConverged(ctx context.Context, name string) error {
	var last string
	for {
		msg, err := s.nc.RequestWithContext(ctx, "$JS.API.STREAM.INFO."+name, nil)
		if err == nil {
			var info struct {
				Cluster *struct {
					Leader  string          `json:"leader"`
					Desired json.RawMessage `json:"desired"`
				} `json:"cluster"`
			}
			if err := json.Unmarshal(msg.Data, &info); err == nil && info.Cluster != nil {
				if info.Cluster.Leader != "" && len(info.Cluster.Desired) == 0 {
					return nil
				}
				last = string(info.Cluster.Desired)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("shardnode: stream %s still converging to its new replicas (%s): %w", name, last, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// followReplicas runs raiseReplicas every replicasEvery until stop closes;
// it logs a failure when it differs from the last one, not every round.
func (s *Service) followReplicas(stop <-chan struct{}, done func()) {
	defer done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel() // a raise in flight ends with Stop
		case <-ctx.Done():
		}
	}()
	t := time.NewTicker(replicasEvery)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		rctx, rcancel := context.WithTimeout(ctx, replicasEvery)
		_, err := s.raiseReplicas(rctx)
		// The stream format gate looks at the projectors' durables at the
		// same pace (streamformat.go).
		if derr := s.judgeDurables(rctx); derr != nil && ctx.Err() == nil {
			s.cfg.Logger.Debug("stream format: projector durables not read", "err", derr)
		}
		rcancel()
		switch {
		case err != nil && err.Error() != last && ctx.Err() == nil:
			s.cfg.Logger.Warn("replicas not raised; trying again", "every", replicasEvery, "err", err)
			last = err.Error()
		case err == nil:
			last = ""
		}
	}
}
