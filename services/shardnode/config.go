package shardnode

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
)

// ContextConfig describes one context served by the node.
type ContextConfig struct {
	Name string
	// Shards is the context's shard count; 0 means what the context
	// already has: the count its data dir was created with, else the one
	// the cluster recorded when a node first served it, else, for a new
	// context, DefaultShards. Start fills it in.
	Shards int
	// Reducer folds events into state; nil means kuma.MergePatch.
	Reducer kuma.Reducer
	Limits  kuma.Limits
	// Durability is DurabilityLocal (default) or DurabilityReplicated.
	Durability string
}

// KeyVault is what a shardnode needs of the keyvault. The keyvault service
// implements it in process; vaultclient.Client implements it over NATS; the
// wiring chooses.
type KeyVault interface {
	keycache.Vault
	// Shred destroys the key; again, it returns the first record.
	Shred(ctx context.Context, r vaultclient.ShredRequest) (*kuma.ForgetReply, error)
	// Forgotten returns the forget record, or nil.
	Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error)
	// ForgottenPseudonym is Forgotten for an entity named by pseudonym.
	ForgottenPseudonym(ctx context.Context, kctx, pseudonym string) (*kuma.ForgetReply, error)
	// Pseudonyms returns the stream pseudonyms of ids, in order (also of
	// forgotten ones: a forget notice names the entity by it).
	Pseudonyms(ctx context.Context, kctx string, entities []string) ([]string, error)
}

// Config of a shardnode.
type Config struct {
	// DataDir holds one folder per context with its shard files.
	DataDir  string
	Contexts []ContextConfig
	// Synchronous is the SQLite durability setting (sqlite.SyncFull by default).
	Synchronous string
	// SnapshotEvery writes a snapshot once this many events were appended
	// since the last one (default 100).
	SnapshotEvery int64
	// IdleTimeout passivates an actor that received nothing for this long
	// (default 2 minutes).
	IdleTimeout time.Duration
	// MaxActors bounds live actors on the node (default 100,000), so memory
	// stays bounded however many distinct entities are touched: past it the
	// least recently used idle actors are passivated.
	MaxActors int
	// MailboxLen is each actor's queue length (default 256).
	MailboxLen int
	// MaxReplyBytes bounds one answer's body (0: the NATS server's max
	// payload less natsbus.ReplyHeadroom; never more than that). History
	// pages are cut to fit it; a state or export over it answers
	// payload_too_large.
	MaxReplyBytes int
	// Keys is the keyvault that holds every entity's data key (required).
	Keys KeyVault
	// KeyCacheSize and KeyCacheTTL bound the node's cache of data keys
	// (defaults 100,000 and 10 minutes).
	KeyCacheSize int
	KeyCacheTTL  time.Duration
	// KeyCache, when set, is the cache of data keys to use instead of one
	// of the node's own (KeyCacheSize and KeyCacheTTL are then the
	// cache's): the services of one process share one, so that an entity's
	// key is held once.
	KeyCache *keycache.Cache
	// Failpoint, when set, is called at named points of risky sequences so
	// that fault tests can stop the process exactly there: the shard
	// writer's "commit-before" and "commit-after", "append-after-ack",
	// "relay-before-publish", "relay-after-publish", "forget-after-mark",
	// "forget-after-shred", and a shard move's "handoff-after-stop",
	// "handoff-after-upload" and "takeover-after-lease". Nil in production.
	Failpoint func(name string)
	// Registerer receives the node's Prometheus collectors (nil: a private
	// registry nobody scrapes).
	Registerer prometheus.Registerer
	// TracerProvider traces requests, commits, key fetches and relay
	// publishes (nil: off).
	TracerProvider trace.TracerProvider
	// NodeName names this node in status and in the cluster (default: the
	// host name, cluster.DefaultNodeName); it must be unique among the
	// cluster's shardnodes.
	NodeName string
	// Cluster tunes membership, leases and shard moves.
	Cluster ClusterConfig
	Logger  *slog.Logger
	Now     func() time.Time
}

// Defaults of the settings RegisterFlags makes flags of: setDefaults and
// the flags' help both use these, so each value lives here only.
const (
	DefaultSnapshotEvery = 100
	DefaultIdleTimeout   = 2 * time.Minute
	DefaultMaxActors     = 100_000
)

// RegisterFlags registers the settings an operator tunes as flags of fs
// (kuma up and kuma serve have them), each with its default and help:
// --sync, --snapshot-every, --idle-timeout and --max-actors. A new tunable
// setting needs its field, its flag here and its default in setDefaults,
// nothing else: the process composes this Config whole. What the wiring
// gives (contexts, keys, logger, registry, clock) is no flag.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Synchronous, "sync", sqlite.SyncFull, "SQLite synchronous setting: FULL (survives power loss) or NORMAL (survives a process crash)")
	fs.Int64Var(&c.SnapshotEvery, "snapshot-every", DefaultSnapshotEvery, "write an entity snapshot every N events")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", DefaultIdleTimeout, "passivate entity actors idle this long")
	fs.IntVar(&c.MaxActors, "max-actors", DefaultMaxActors, "live entity actors at most; least recently used idle ones are passivated")
}

func (c *Config) setDefaults() {
	if c.Synchronous == "" {
		c.Synchronous = sqlite.SyncFull
	}
	if c.SnapshotEvery <= 0 {
		c.SnapshotEvery = DefaultSnapshotEvery
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.MaxActors <= 0 {
		c.MaxActors = DefaultMaxActors
	}
	if c.MailboxLen <= 0 {
		c.MailboxLen = 256
	}
	if c.KeyCacheSize <= 0 {
		c.KeyCacheSize = 100_000
	}
	if c.KeyCacheTTL <= 0 {
		c.KeyCacheTTL = 10 * time.Minute
	}
	if c.NodeName == "" {
		c.NodeName = cluster.DefaultNodeName()
	}
	if c.Failpoint == nil {
		c.Failpoint = func(string) {}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	c.Cluster.setDefaults()
	for i := range c.Contexts {
		if c.Contexts[i].Durability == "" {
			c.Contexts[i].Durability = DurabilityLocal
		}
		if c.Contexts[i].Reducer == nil {
			c.Contexts[i].Reducer = kuma.MergePatch{}
		}
		c.Contexts[i].Limits = c.Contexts[i].Limits.WithDefaults()
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("shardnode: DataDir is required"))
	}
	if len(c.Contexts) == 0 {
		errs = append(errs, errors.New("shardnode: at least one context is required"))
	}
	if err := cluster.ValidateNode(c.NodeName); err != nil && c.NodeName != "" {
		errs = append(errs, fmt.Errorf("shardnode: %w", err))
	}
	if c.Keys == nil {
		errs = append(errs, errors.New("shardnode: Keys (the keyvault) is required: event data is always sealed"))
	}
	seen := map[string]bool{}
	for _, cc := range c.Contexts {
		if err := kuma.ValidateContext(cc.Name); err != nil {
			errs = append(errs, fmt.Errorf("shardnode: %w", err))
		}
		if seen[cc.Name] {
			errs = append(errs, fmt.Errorf("shardnode: context %q is listed twice", cc.Name))
		}
		seen[cc.Name] = true
		if err := ValidateDurability(cc.Durability); err != nil {
			errs = append(errs, fmt.Errorf("shardnode: context %q: %w", cc.Name, err))
		}
		if cc.Shards != 0 { // 0: the context's own count (Start)
			if err := ValidateShards(cc.Shards); err != nil {
				errs = append(errs, fmt.Errorf("shardnode: context %q: %w", cc.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// MaxShards is the most shards a context may have.
const MaxShards = 4096

// DefaultShards is the shard count of a new context when none is given.
const DefaultShards = 16

// ValidateShards checks a context's shard count when one is given. The
// shardnode's Validate checks each context with it, and internal/app checks
// --shards with it for every target, so the rule and its message live here
// only.
func ValidateShards(n int) error {
	if n < 1 || n > MaxShards {
		return fmt.Errorf("shards must be 1 to %d, got %d", MaxShards, n)
	}
	return nil
}

// ValidateDurability checks a context's durability ("" is the default,
// local).
func ValidateDurability(d string) error {
	switch d {
	case "", DurabilityLocal, DurabilityReplicated:
		return nil
	}
	return fmt.Errorf("durability must be %s or %s, got %q", DurabilityLocal, DurabilityReplicated, d)
}

// contextMeta is <data>/<ctx>/context.json: what the context was created
// with. Entity → shard is xxhash mod shards, so the count can never change
// under existing data.
type contextMeta struct {
	Context   string    `json:"context"`
	Shards    int       `json:"shards"`
	CreatedAt time.Time `json:"created_at"`
}

func contextDir(dataDir, name string) string { return filepath.Join(dataDir, name) }

func shardPath(dataDir, name string, shard int) string {
	return filepath.Join(contextDir(dataDir, name), fmt.Sprintf("shard-%03d.db", shard))
}

func decodeMeta(b []byte) (contextMeta, error) {
	var m contextMeta
	err := json.Unmarshal(b, &m)
	return m, err
}

// ClusterConfig tunes membership, leases and shard moves. The zero value
// suits a LAN; tests shorten the times.
type ClusterConfig struct {
	// Replicas of the stream, the KV buckets and the snapshot store (default
	// 1; 3 once the NATS cluster has three JetStream servers).
	Replicas int
	// Heartbeat is how often the node renews its membership (default 1 s);
	// MemberTTL how long a silent member counts as alive (default 5 s).
	Heartbeat time.Duration
	MemberTTL time.Duration
	// LeaseTTL is how long a shard lease lasts without renewal (default 6 s).
	// The holder renews every LeaseTTL/4 and stops writing at 3/4 of it.
	LeaseTTL time.Duration
	// Tick is how often the node compares the shard map with where shards
	// should be (default 500 ms).
	Tick time.Duration
	// MaxMoves bounds the shards this node hands off or takes at once
	// (default 2), so a join is a trickle of moves, not a storm.
	MaxMoves int
	// MinHold is how long a node keeps a shard it just took before it may
	// move it again (default 3 s), so views that disagree for a moment do
	// not bounce a shard between two nodes.
	MinHold time.Duration
	// SnapshotEvery uploads a snapshot of each owned shard that changed, so
	// a failover replays little of the stream (default 1 minute; negative:
	// only on moves).
	SnapshotEvery time.Duration
}

func (c *ClusterConfig) setDefaults() {
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	if c.Heartbeat <= 0 {
		c.Heartbeat = time.Second
	}
	if c.MemberTTL <= 0 {
		c.MemberTTL = 5 * c.Heartbeat
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 6 * time.Second
	}
	if c.Tick <= 0 {
		c.Tick = 500 * time.Millisecond
	}
	if c.MaxMoves <= 0 {
		c.MaxMoves = 2
	}
	if c.MinHold <= 0 {
		c.MinHold = 3 * time.Second
	}
	if c.SnapshotEvery == 0 {
		c.SnapshotEvery = time.Minute
	}
}

// Durability settings of a context: what an acknowledged append survives.
const (
	// DurabilityLocal acknowledges after the local fsync. Losing the node's
	// disk for good loses what it had not yet published to the stream
	// (normally a few milliseconds of appends; see relay lag in status).
	DurabilityLocal = "local"
	// DurabilityReplicated acknowledges once the stream (replicated by the
	// NATS cluster) has the events too: losing a node loses nothing
	// acknowledged.
	DurabilityReplicated = "replicated"
)
