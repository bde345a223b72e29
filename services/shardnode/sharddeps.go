package shardnode

import (
	"log/slog"
	"time"

	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"
)

// shardDeps is what a shard needs of its node, given once when the node
// opens it (Service.shardDeps). The shard holds no *Service: so it runs,
// and is tested, on a bare SQLite file with fakes for the NATS side.
//
// The channels and the key cache are the node's, shared by all its shards;
// the rest are values or functions fixed for the shard's life.
type shardDeps struct {
	logger *slog.Logger
	tracer trace.Tracer
	// now is the wall clock: an actor's last use, the idle sweep's cutoff
	// and the actors' timestamps.
	now func() time.Time
	// leaseNow is the owner's monotonic clock, which the lease deadline is
	// measured on (fence). It is bound to the owner the node had when the
	// shard opened: a commit cut short by a bounded stop can still reach
	// the fence after the node has dropped its owner.
	leaseNow func() time.Duration
	// idleTimeout passivates an actor unused for this long (the sweep).
	idleTimeout time.Duration
	// mailboxLen bounds each actor's queue; a request past it is refused.
	mailboxLen int
	// snapshotEvery is how often the actors write an entity snapshot.
	snapshotEvery int64
	// dataDir holds the shard files; a backup copy is made beside its
	// shard's file before it is uploaded.
	dataDir string
	// metrics are the node's collectors: the shard counts requests, full
	// mailboxes, full disks, fenced commits and failed replies into them,
	// and hands the actors their share.
	metrics *metrics
	// nc carries the shard's subscription and its answers; its server's max
	// payload bounds what the relay publishes at once.
	nc *nats.Conn
	// js reads the context's stream (catch-up, the relay) and stores backup
	// copies.
	js jetstream.JetStream
	// streamFormat is the stream message format the relay writes (the
	// node's stream format gate, streamformat.go).
	streamFormat func() int
	// keys is the node's data-key cache (feed, catch-up, actors, relay
	// pseudonyms); an erase drops the forgotten entity's key from it.
	keys *keycache.Cache
	// vault is the keyvault itself: an erase shreds there, a catch-up
	// confirms forget notices there, and the actors ask it of forgotten
	// entities.
	vault KeyVault
	// feedSlots bounds the feed requests the node serves at once (each
	// holds a goroutine while it waits); backupSlots lets one backup copy
	// run per node. Both are the node's, shared by its shards.
	feedSlots   chan struct{}
	backupSlots chan struct{}
	// corrupt takes a shard whose file is damaged out of service
	// (Service.shardCorrupt): the node decides what becomes of it.
	corrupt func(kctx string, n int, err error) error
	// lost stops serving the shard: another owner claimed it in the
	// stream. It must not wait for the shard (the relay calls it).
	lost func(why string)
	// failpoint is the fault tests' hook (a no-op outside them); hooked
	// says the config brought one, so that the actors skip the work that
	// only feeds a failpoint when it did not.
	failpoint func(name string)
	hooked    bool
}

// shardDeps is what this node gives each shard it opens; lost is that
// shard's own (it names the shard).
func (s *Service) shardDeps(lost func(why string)) shardDeps {
	return shardDeps{
		logger: s.cfg.Logger, tracer: s.tracer,
		now: s.cfg.Now, leaseNow: s.owner.now,
		idleTimeout: s.cfg.IdleTimeout, mailboxLen: s.cfg.MailboxLen, snapshotEvery: s.cfg.SnapshotEvery,
		dataDir: s.cfg.DataDir, metrics: s.metrics,
		nc: s.nc, js: s.js, streamFormat: s.formats.streamFormat,
		keys: s.keys, vault: s.cfg.Keys,
		feedSlots: s.feedSlots, backupSlots: s.backupSlots,
		corrupt: s.shardCorrupt, lost: lost,
		failpoint: s.cfg.Failpoint, hooked: s.hooked,
	}
}
