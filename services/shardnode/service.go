package shardnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
)

// Service is a shardnode. Start opens every shard of every configured context
// and subscribes to their subjects; Stop stops taking requests, lets in-flight
// commits finish and closes the files. Start and Stop are not concurrent-safe
// with each other; everything else is.
type Service struct {
	cfg      Config
	nc       *nats.Conn
	keys     *keycache.Cache
	shredSub *nats.Subscription
	js       jetstream.JetStream
	micro    *natsbus.Service
	metrics  *metrics
	tracer   trace.Tracer
	// hooked is set when the config brought a Failpoint (fault tests): the
	// work that only feeds a failpoint is skipped without one.
	hooked bool
	// maxReply is the largest answer body (Config.MaxReplyBytes, within
	// what the NATS server carries), fixed at Start.
	maxReply int

	owner   *owner     // membership, leases and moves (nil before Start)
	formats formatGate // which stream message format the relays write (streamformat.go)
	started time.Time

	mu     sync.Mutex
	shards []*shard

	corruptMu sync.Mutex
	corrupt   map[shardKey]*corruptShard // shards taken out of service (corrupt.go)
	checkSem  chan struct{}              // one background file check at a time
	// feedSlots bounds the feed requests served at once (feed.go): each
	// holds a goroutine while it waits for new events.
	feedSlots chan struct{}
	// backupSlots lets one backup copy (backup.go) run at a time.
	backupSlots chan struct{}
	bg          sync.WaitGroup // file checks and corrupt shards stopping; Stop waits
}

// New builds a shardnode that talks over nc. It does no I/O.
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	hooked := cfg.Failpoint != nil
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if nc == nil {
		return nil, errors.New("shardnode: a NATS connection is required")
	}
	tracer := telemetry.Tracer(cfg.TracerProvider)
	// Start fills in the shard counts of this copy, not the caller's.
	cfg.Contexts = slices.Clone(cfg.Contexts)
	s := &Service{cfg: cfg, nc: nc, tracer: tracer, hooked: hooked, keys: cfg.KeyCache,
		corrupt: map[shardKey]*corruptShard{}, checkSem: make(chan struct{}, 1), feedSlots: make(chan struct{}, maxFeedRequests),
		backupSlots: make(chan struct{}, 1)}
	if s.keys == nil {
		s.keys = keycache.New(cfg.Keys, cfg.KeyCacheSize, cfg.KeyCacheTTL, cfg.Now, tracer)
	}
	reg := cfg.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry() // counted, just not exported
	}
	m, err := newMetrics(reg)
	if err == nil {
		err = s.registerGauges(reg)
	}
	if err != nil {
		return nil, fmt.Errorf("shardnode: metrics: %w", err)
	}
	s.metrics = m
	return s, nil
}

// Start joins the cluster (a cluster of one when alone), takes the shards
// this node should own that nobody holds, and begins serving them; shards
// held by other nodes come over as they hand them off.
func (s *Service) Start(ctx context.Context) error {
	s.started = s.cfg.Now().UTC()
	s.maxReply = natsbus.ReplyLimit(s.nc)
	if s.cfg.MaxReplyBytes > 0 {
		s.maxReply = min(s.maxReply, s.cfg.MaxReplyBytes)
	}
	sub, err := s.keys.SubscribeShredded(s.nc)
	if err != nil {
		return fmt.Errorf("shardnode: subscribe to shreds: %w", err)
	}
	s.shredSub = sub
	js, err := jetstream.New(s.nc)
	if err != nil {
		return fmt.Errorf("shardnode: jetstream: %w", err)
	}
	s.js = js
	var replicas int
	var store *cluster.Store
	err = natsbus.RetryJetStream(ctx, s.cfg.Logger, func(ctx context.Context) error {
		var err error
		if replicas, err = s.replicaFloor(ctx); err != nil { // replicas.go: never below what they have
			return err
		}
		for _, cc := range s.cfg.Contexts {
			if err := ensureStream(ctx, js, cc.Name, replicas); err != nil {
				return err
			}
		}
		store, err = cluster.Open(ctx, js, cluster.Config{
			Node: s.cfg.NodeName, Replicas: replicas,
			MemberTTL: s.cfg.Cluster.MemberTTL, LeaseTTL: s.cfg.Cluster.LeaseTTL,
			Logger: s.cfg.Logger, Now: s.cfg.Now,
		})
		return err
	})
	if err != nil {
		_ = s.Stop(ctx)
		return fmt.Errorf("shardnode: %w (does the NATS server run JetStream?)", err)
	}
	for i := range s.cfg.Contexts {
		cc := &s.cfg.Contexts[i]
		err := s.checkContextDir(ctx, store, cc)
		if err == nil {
			err = natsbus.RetryJetStream(ctx, s.cfg.Logger, func(ctx context.Context) error {
				return store.AgreeShards(ctx, cc.Name, cc.Shards)
			})
			if err != nil {
				err = fmt.Errorf("shardnode: %w", err)
			}
		}
		if err != nil {
			store.Close()
			_ = s.Stop(ctx)
			return err
		}
	}
	moves, abortMoves := context.WithCancel(context.Background())
	s.owner = &owner{s: s, store: store, cfg: s.cfg.Cluster, base: time.Now(),
		moving: map[shardKey]string{}, refusing: map[shardKey]*refusal{}, stop: make(chan struct{}),
		moves: moves, abortMoves: abortMoves}
	if err := s.owner.heartbeat(ctx); err != nil {
		_ = s.Stop(ctx)
		return fmt.Errorf("shardnode: join the cluster: %w", err)
	}
	// The stream format gate's first look, before any relay runs.
	dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
	if err := s.judgeDurables(dctx); err != nil {
		s.cfg.Logger.Warn("stream format: projector durables not read; relays write format 1 until they are", "err", err)
	}
	dcancel()
	s.owner.judgeMembers()
	s.owner.reconcile(ctx, true)
	if err := s.serveStatus(ctx); err != nil {
		_ = s.Stop(ctx)
		return err
	}
	// Flush so that the subscriptions are known to the server before Start
	// returns and the caller reports ready.
	if err := natsbus.Flush(ctx, s.nc); err != nil {
		_ = s.Stop(ctx)
		return fmt.Errorf("shardnode: flush subscriptions: %w", err)
	}
	s.owner.done.Add(1)
	go s.owner.run()
	if err := s.raiseAtStart(ctx); err != nil {
		s.cfg.Logger.Warn("replicas not raised at start; trying again", "every", replicasEvery, "err", err)
	}
	s.owner.done.Add(1)
	go s.followReplicas(s.owner.stop, s.owner.done.Done)
	s.cfg.Logger.Info("shardnode started", "node", s.cfg.NodeName, "contexts", len(s.cfg.Contexts),
		"shards", len(s.allShards()), "members", len(store.Members()), "data", s.cfg.DataDir)
	return nil
}

// shardCountOf is the count of a context with no data dir here yet: the
// one the cluster recorded (a node joining a cluster that serves it), else
// DefaultShards for a new context.
func (s *Service) shardCountOf(ctx context.Context, store *cluster.Store, kctx string) (int, error) {
	var n int
	var ok bool
	err := natsbus.RetryJetStream(ctx, s.cfg.Logger, func(ctx context.Context) error {
		var err error
		n, ok, err = store.ShardCount(ctx, kctx)
		return err
	})
	switch {
	case err != nil:
		return 0, fmt.Errorf("shardnode: the shard count of context %q: %w", kctx, err)
	case ok:
		s.cfg.Logger.Info("shard count taken from the cluster", "context", kctx, "shards", n)
		return n, nil
	}
	s.cfg.Logger.Info("new context", "context", kctx, "shards", DefaultShards)
	return DefaultShards, nil
}

// Shards is the shard count of context kctx (0 if it is not served here),
// known once Start has returned.
func (s *Service) Shards(kctx string) int {
	for _, cc := range s.cfg.Contexts {
		if cc.Name == kctx {
			return cc.Shards
		}
	}
	return 0
}

// checkContextDir creates <data>/<ctx>/context.json on first start and
// refuses a different shard count afterwards. A context given no count
// (0) takes the file's, or on first start the cluster's or the default
// (shardCountOf): so a default can change without refusing the data dirs
// and clusters made under the old one.
func (s *Service) checkContextDir(ctx context.Context, store *cluster.Store, cc *ContextConfig) error {
	dir := contextDir(s.cfg.DataDir, cc.Name)
	if err := sqlite.PrepareDir(dir); err != nil {
		return fmt.Errorf("shardnode: %w", err)
	}
	path := filepath.Join(dir, "context.json")
	if err := sqlite.MakePrivate(path); err != nil {
		return fmt.Errorf("shardnode: %w", err)
	}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if cc.Shards == 0 {
			if cc.Shards, err = s.shardCountOf(ctx, store, cc.Name); err != nil {
				return err
			}
		}
		meta := contextMeta{Context: cc.Name, Shards: cc.Shards, CreatedAt: s.cfg.Now().UTC()}
		b, _ := json.MarshalIndent(meta, "", "  ")
		return writeFileSync(path, append(b, '\n'))
	case err != nil:
		return fmt.Errorf("shardnode: read %s: %w", path, err)
	}
	meta, err := decodeMeta(b)
	if err != nil {
		return fmt.Errorf("shardnode: %s is not valid JSON: %w", path, err)
	}
	if cc.Shards == 0 {
		if err := ValidateShards(meta.Shards); err != nil {
			return fmt.Errorf("shardnode: %s: %w", path, err)
		}
		cc.Shards = meta.Shards
	}
	if meta.Shards != cc.Shards {
		return fmt.Errorf("shardnode: context %q in %s was created with %d shards, not %d; "+
			"entities are placed by xxhash mod shards, so changing the count would lose them. "+
			"Start with --shards %d", cc.Name, dir, meta.Shards, cc.Shards, meta.Shards)
	}
	return nil
}

// writeFileSync writes through a temporary file and renames it, so a crash
// never leaves a half-written context.json.
func writeFileSync(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, sqlite.PrivateFileMode)
	if err != nil {
		return fmt.Errorf("shardnode: write %s: %w", path, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("shardnode: write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("shardnode: sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("shardnode: write %s: %w", path, err)
	}
	return os.Rename(tmp, path)
}

// openShard opens a leased shard's file under the lease's epoch, with the
// lease deadline as its commit fence. It does not serve it yet.
func (s *Service) openShard(ctx context.Context, cc *ContextConfig, n int, lease cluster.Lease, sent time.Duration) (*shard, error) {
	total := 0
	for _, c := range s.cfg.Contexts {
		total += c.Shards
	}
	var sh *shard
	store, err := sqlite.Open(ctx, sqlite.Config{
		Path:        shardPath(s.cfg.DataDir, cc.Name, n),
		Context:     cc.Name,
		Shard:       n,
		Shards:      cc.Shards,
		Synchronous: s.cfg.Synchronous,
		Logger:      s.cfg.Logger,
		OnGroup:     s.metrics.onGroup,
		Tracer:      s.tracer,
		Epoch:       lease.Epoch,
		Fence:       func() error { return sh.fence() },
		Failpoint:   s.cfg.Failpoint,
		OnCorrupt:   func(err error) { _ = s.shardCorrupt(cc.Name, n, err) },
	})
	if err != nil {
		return nil, err
	}
	sh = newShard(s.shardDeps(func(why string) { s.lostShard(sh, why) }), cc, n, store, max(1, s.cfg.MaxActors/total), s.maxReply)
	sh.setLease(lease, sent, s.cfg.Cluster.LeaseTTL)
	sh.acquired = s.owner.now()
	sh.snapshotTried.Store(int64(sh.acquired))
	return sh, nil
}

func (s *Service) addShard(sh *shard) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.shards = append(s.shards, sh)
}

// removeShard takes sh out of the served set; false if it was not there.
func (s *Service) removeShard(sh *shard) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.shards {
		if x == sh {
			s.shards = append(s.shards[:i], s.shards[i+1:]...)
			return true
		}
	}
	return false
}

func (s *Service) shardAt(k shardKey) *shard {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sh := range s.shards {
		if sh.cc.Name == k.ctx && sh.n == k.n {
			return sh
		}
	}
	return nil
}

func (s *Service) allShards() []*shard {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*shard(nil), s.shards...)
}

// ShardStats describes one open shard, for status and tests.
type ShardStats struct {
	Context    string
	Shard      int
	LiveActors int
	Passivated int64
	Published  int64 // last position in the event stream
	RelayLag   int64 // committed but not yet published
	Store      sqlite.Stats
}

// Stats returns a snapshot of every open shard.
func (s *Service) Stats() []ShardStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ShardStats, 0, len(s.shards))
	for _, sh := range s.shards {
		out = append(out, sh.stats())
	}
	return out
}

// KeyCacheStats returns the data-key cache's hits and misses.
func (s *Service) KeyCacheStats() (hits, misses int64) { return s.keys.Stats() }

// KeyCache is the node's cache of data keys, for the other services of its
// process to share (projector.Config.KeyCache).
func (s *Service) KeyCache() *keycache.Cache { return s.keys }
