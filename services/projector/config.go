package projector

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
)

// KeyVault is what the projector needs of the keyvault: keys to open
// payloads (by the pseudonym the stream names an entity by), and its word
// that an entity was forgotten before a notice drops anything.
type KeyVault interface {
	keycache.Vault
	// Forgotten returns the forget record of an entity, or nil.
	Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error)
	// ForgottenPseudonym returns the forget record of the entity of a
	// pseudonym, or nil.
	ForgottenPseudonym(ctx context.Context, kctx, pseudonym string) (*kuma.ForgetReply, error)
}

// Config configures a projector for one context.
type Config struct {
	Context string
	// Reducer folds the entities projection's states; nil is merge patch,
	// as in the shardnode. It must be the shardnode's reducer.
	Reducer kuma.Reducer
	// DataDir holds the read models, under <DataDir>/projector/<context>.
	DataDir string
	// NodeName names this projector's durable consumers: each projector
	// instance keeps its own read models.
	NodeName string
	// Specs are the declared projections.
	Specs []projection.Spec
	// Keys opens payloads and confirms forget notices: the keyvault in
	// process or over NATS.
	Keys KeyVault
	// Dial opens a NATS connection for one generation's subscriber (closing
	// a Watermill subscriber drains its connection, so none is shared).
	Dial func() (*nats.Conn, error)

	QueryTimeout time.Duration // a query's time limit (default 2s)
	// MaxReplyBytes bounds one answer's body (0: the NATS server's max
	// payload less natsbus.ReplyHeadroom; never more than that). Query
	// pages are cut to fit it, with next_cursor for the rest.
	MaxReplyBytes int
	// ReplicaStatusWait bounds how long a status request waits for the
	// other replicas' answers (default 1s), ReplicaAdminWait the same for
	// rebuild, retry and skip (default 3s). A replica that answers later
	// is reported missing.
	ReplicaStatusWait time.Duration
	ReplicaAdminWait  time.Duration
	AckWait           time.Duration // longest apply of one message (default 30s)
	// StallAfter is how long a generation may see no delivery while its
	// durable counts one out before it is recreated (default 5s; see
	// generation.stalled). It must exceed StoppedRetryEvery.
	StallAfter        time.Duration
	StoppedRetryEvery time.Duration // how often a stopped projection looks for an operator's action (default 1s)
	KeyCacheSize      int
	KeyCacheTTL       time.Duration
	// KeyCache, when set, is the cache of data keys to use instead of one
	// of the projector's own (KeyCacheSize and KeyCacheTTL are then the
	// cache's): in one process it is the shardnode's, so that an entity's
	// key is held once and a new entity's key, fetched for its first
	// append, is found here without a call to the keyvault.
	KeyCache *keycache.Cache

	// Failpoint is the fault tests' hook: projector-before-apply and
	// projector-after-apply (committed, not yet acknowledged).
	Failpoint func(name string)

	Logger         *slog.Logger
	Now            func() time.Time
	Registerer     prometheus.Registerer
	TracerProvider trace.TracerProvider
}

func (c *Config) setDefaults() {
	if c.Reducer == nil {
		c.Reducer = kuma.MergePatch{}
	}
	if c.NodeName == "" {
		c.NodeName = cluster.DefaultNodeName()
	}
	if c.QueryTimeout == 0 {
		c.QueryTimeout = 2 * time.Second
	}
	if c.ReplicaStatusWait == 0 {
		c.ReplicaStatusWait = time.Second
	}
	if c.ReplicaAdminWait == 0 {
		c.ReplicaAdminWait = 3 * time.Second
	}
	if c.AckWait == 0 {
		c.AckWait = 30 * time.Second
	}
	if c.StoppedRetryEvery == 0 {
		c.StoppedRetryEvery = time.Second
	}
	if c.StallAfter == 0 {
		c.StallAfter = max(5*time.Second, 3*c.StoppedRetryEvery)
	}
	if c.KeyCacheSize == 0 {
		c.KeyCacheSize = 100_000
	}
	if c.KeyCacheTTL == 0 {
		c.KeyCacheTTL = 5 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Failpoint == nil {
		c.Failpoint = func(string) {}
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
}

// Validate reports every problem of the config at once.
func (c *Config) Validate() error {
	var errs []error
	if err := kuma.ValidateContext(c.Context); err != nil {
		errs = append(errs, err)
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("projector: DataDir is required (read models live under it)"))
	}
	if c.Keys == nil {
		errs = append(errs, errors.New("projector: Keys is required to open event payloads"))
	}
	if c.Dial == nil {
		errs = append(errs, errors.New("projector: Dial is required (each subscriber has its own connection)"))
	}
	return errors.Join(errs...)
}
