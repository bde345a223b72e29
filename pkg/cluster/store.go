package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Store is a node's handle on the cluster's buckets. Safe for concurrent use.
type Store struct {
	cfg     Config
	members jetstream.KeyValue
	leases  jetstream.KeyValue
	snaps   jetstream.ObjectStore
	// snapStream is the object store's stream, where a replaced
	// snapshot's chunks are erased (snapshots.go), in the background:
	// erasing ends with Close.
	snapStream  jetstream.Stream
	erasing     sync.WaitGroup
	eraseCtx    context.Context
	eraseCancel context.CancelFunc

	mu          sync.Mutex
	memberCache map[string]Member
	leaseCache  map[string]Lease
	pinCache    map[string]string
	watchers    []jetstream.KeyWatcher
	changed     chan struct{}
	ready       chan struct{}
}

// Open creates (or updates the replicas of) the buckets and starts watching
// members, leases and pins. Close stops the watches.
func Open(ctx context.Context, js jetstream.JetStream, cfg Config) (*Store, error) {
	cfg.setDefaults()
	if err := ValidateNode(cfg.Node); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	s := &Store{cfg: cfg, memberCache: map[string]Member{}, leaseCache: map[string]Lease{}, pinCache: map[string]string{},
		changed: make(chan struct{}, 1)}
	var err error
	s.members, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: MembersBucket, Description: "Kuma shardnodes and their heartbeats",
		History: 1, Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: bucket %s: %w", MembersBucket, err)
	}
	s.leases, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: LeasesBucket, Description: "Kuma shard leases (owner, epoch) and operator pins",
		History: 1, Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: bucket %s: %w", LeasesBucket, err)
	}
	s.snaps, err = js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket: SnapshotsBucket, Description: "Kuma shard snapshots, for moves and failover",
		Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: object store %s: %w", SnapshotsBucket, err)
	}
	if s.snapStream, err = js.Stream(ctx, "OBJ_"+SnapshotsBucket); err != nil {
		return nil, fmt.Errorf("cluster: object store %s: %w", SnapshotsBucket, err)
	}
	s.eraseCtx, s.eraseCancel = context.WithCancel(context.Background())
	s.sweepSnapshots()
	if err := s.watch(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// watch keeps the caches current. Open returns once each watch has
// delivered the bucket's current values.
func (s *Store) watch(ctx context.Context) error {
	wm, err := s.members.WatchAll(context.Background())
	if err != nil {
		return fmt.Errorf("cluster: watch members: %w", err)
	}
	wl, err := s.leases.WatchAll(context.Background())
	if err != nil {
		_ = wm.Stop()
		return fmt.Errorf("cluster: watch leases: %w", err)
	}
	s.watchers = []jetstream.KeyWatcher{wm, wl}
	var initial sync.WaitGroup
	initial.Add(2)
	go s.follow(wm, &initial, s.onMember)
	go s.follow(wl, &initial, s.onLease)
	done := make(chan struct{})
	go func() { initial.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("cluster: reading the buckets: %w", ctx.Err())
	}
}

func (s *Store) follow(w jetstream.KeyWatcher, initial *sync.WaitGroup, on func(jetstream.KeyValueEntry)) {
	first := true
	for e := range w.Updates() {
		if e == nil { // end of the current values
			if first {
				initial.Done()
				first = false
			}
			continue
		}
		on(e)
	}
	if first {
		initial.Done()
	}
}

func (s *Store) onMember(e jetstream.KeyValueEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.memberCache[e.Key()]
	if e.Operation() != jetstream.KeyValuePut {
		delete(s.memberCache, e.Key())
		s.nudge()
		return
	}
	var m Member
	if err := json.Unmarshal(e.Value(), &m); err != nil {
		s.cfg.Logger.Warn("cluster: unreadable member entry", "key", e.Key(), "err", err)
		return
	}
	m.Seen = e.Created()
	s.memberCache[e.Key()] = m
	if !had || old.Draining != m.Draining || !old.Started.Equal(m.Started) {
		s.nudge() // a member came or is leaving; a heartbeat changes nothing
	}
}

// Changed is signalled (at most one pending signal) when the placement of
// shards may have changed: a member came, left or started draining, a pin
// changed, or a lease changed hands or was released. A node reacts at once
// instead of on its next tick, which is most of a move's gap.
func (s *Store) Changed() <-chan struct{} { return s.changed }

func (s *Store) nudge() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *Store) onLease(e jetstream.KeyValueEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := e.Key()
	if strings.HasPrefix(key, "shards.") {
		return // a context's shard count (AgreeShards), read when checked
	}
	if strings.HasPrefix(key, "pin.") {
		if e.Operation() != jetstream.KeyValuePut {
			delete(s.pinCache, key)
		} else {
			s.pinCache[key] = string(e.Value())
		}
		s.nudge()
		return
	}
	if e.Operation() != jetstream.KeyValuePut {
		delete(s.leaseCache, key)
		s.nudge()
		return
	}
	l, err := decodeLease(e)
	if err != nil {
		s.cfg.Logger.Warn("cluster: unreadable lease", "key", key, "err", err)
		return
	}
	old, ok := s.leaseCache[key]
	if ok && old.Revision > l.Revision {
		return // our own write already recorded a newer one
	}
	s.leaseCache[key] = l
	if !ok || old.Owner != l.Owner || old.HandoffTo != l.HandoffTo || old.Serving != l.Serving {
		s.nudge()
	}
}

// closeWait bounds Close. Stopping a watch deletes its consumer, which
// waits for the bucket's stream to answer; a stream that lost its quorum
// (the whole cluster stopping) answers nothing for seconds. A consumer
// left behind is ephemeral: the server removes it once it is idle.
const closeWait = 500 * time.Millisecond

// Close stops the watches, waiting at most closeWait for the server.
func (s *Store) Close() {
	ws := s.watchers
	s.watchers = nil
	if s.eraseCancel != nil {
		s.eraseCancel() // an erase cut short is finished by the next Open's sweep
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, w := range ws {
			_ = w.Stop()
		}
		s.erasing.Wait()
	}()
	select {
	case <-done:
	case <-time.After(closeWait):
		s.cfg.Logger.Debug("cluster: the watches' consumers were not deleted in time; the server drops them when idle")
	}
}

// Config returns the effective configuration.
func (s *Store) Config() Config { return s.cfg }
