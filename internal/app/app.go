package app

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/services/console"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/kumadb/kuma/services/projector"
	"github.com/kumadb/kuma/services/shardnode"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// App is one Kuma process: the modules of its target, started in dependency
// order. Start and Stop must not run concurrently.
type App struct {
	cfg   Config
	srv   *server.Server
	nc    *nats.Conn
	vault *keyvault.Service
	// shards is the shardnode of this process, if it runs one: it knows
	// the context's shard count once started (Config.Shards may be 0).
	shards *shardnode.Service
	// registry holds every module's metrics; one per App, never global.
	registry *prometheus.Registry
	// ownTP is the tracer provider the App built (and must flush on Stop).
	ownTP *sdktrace.TracerProvider
	// clusterAddr is the embedded server's route address (host:port), set
	// once it listens; read concurrently with Start (see ClusterAddr).
	clusterAddr atomic.Value
	started     []startedModule
	// endConversion stops this node's answer that it is carrying its
	// standalone data into the cluster (startJetStream); nil when it is not.
	endConversion func()
	// specs are the declared projections, checked in New.
	specs []projection.Spec
}

type startedModule struct {
	name string
	svc  service
}

// New checks cfg (and the projections it declares) and builds an App; the
// only I/O is reading the projections file.
func New(cfg Config) (*App, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	a := &App{cfg: cfg, registry: prometheus.NewRegistry()}
	// A projections file is checked before anything starts, so a typo is
	// reported with its line and nothing runs half-way.
	if slices.Contains(order(cfg.Target), ModuleProjector) {
		specs := append([]projection.Spec(nil), cfg.Projections...)
		if cfg.ProjectionsFile != "" {
			fromFile, err := projection.Load(cfg.ProjectionsFile)
			if err != nil {
				return nil, err
			}
			specs = append(specs, fromFile...)
		}
		if _, err := projection.CompileAll(context.Background(), specs); err != nil {
			return nil, err
		}
		a.specs = specs
	}
	return a, nil
}

// Registry is the App's Prometheus registry.
func (a *App) Registry() *prometheus.Registry { return a.registry }

// Shards is the context's shard count as this process knows it: resolved
// by its shardnode once started, else as configured (0: not known here).
func (a *App) Shards() int { return a.shardCount() }

// Start starts every module of the target. On failure it stops what it had
// started and returns the error.
func (a *App) Start(ctx context.Context) error {
	if a.cfg.TracerProvider == nil && a.cfg.Tracing != telemetry.ExportNone {
		tp, err := telemetry.NewProvider(ctx, a.cfg.Tracing, os.Stdout, "kuma-"+a.cfg.Target)
		if err != nil {
			return err
		}
		a.ownTP, a.cfg.TracerProvider = tp, tp
	}
	for _, name := range order(a.cfg.Target) {
		if name == ModuleShardnode && a.cfg.Failpoint != nil {
			a.cfg.Failpoint("start-before-shardnode")
		}
		svc, err := a.build(name)
		if err != nil {
			return errors.Join(err, a.Stop(ctx))
		}
		if err := svc.Start(ctx); err != nil {
			return errors.Join(fmt.Errorf("start %s: %w", name, err), a.Stop(ctx))
		}
		a.started = append(a.started, startedModule{name, svc})
	}
	a.finishConversion()
	return nil
}

// finishConversion lets members that wait for this node's conversion
// (natsbus.WaitConversions) go on.
func (a *App) finishConversion() {
	if a.endConversion != nil {
		a.endConversion()
		a.endConversion = nil
	}
}

// slowStop is how long a module's stop may take before it is logged.
const slowStop = 500 * time.Millisecond

// projectorStopMax bounds the projector's stop. Its deliveries in flight
// may wait on what is going away when the whole cluster stops (a stream
// without quorum, a keyvault on a node that is gone), and its message
// router waits 10 s for them, while the node's stop must fit in its grace
// period. Leaving it is safe: a delivery is acknowledged only once its
// read-model transaction commits, so what was in flight is delivered again
// at the next start.
const projectorStopMax = 3 * time.Second

// stopModule stops one module. The projector's stop is waited for at most
// projectorStopMax; the rest of it is waited for in the end (late, it
// returns into *late), once the connection is closed, which ends what it
// was waiting on.
func (a *App) stopModule(ctx context.Context, m startedModule, late *[]chan error) error {
	if m.name != ModuleProjector {
		return m.svc.Stop(ctx)
	}
	done := make(chan error, 1)
	go func() { done <- m.svc.Stop(ctx) }()
	select {
	case err := <-done:
		return err
	case <-time.After(projectorStopMax):
		a.cfg.Logger.Warn("the projector did not stop in time; stopping the rest first (what it was applying is delivered again at the next start)",
			"after", projectorStopMax)
		*late = append(*late, done)
		return nil
	}
}

// Stop stops the started modules in reverse order: routers stop taking
// requests first, shardnodes finish their commits, the embedded server goes
// last.
func (a *App) Stop(ctx context.Context) error {
	a.finishConversion() // a start that failed half-way
	var errs []error
	// The shardnode says it is leaving before anything stops, so that its
	// peers (which may be stopping too) stop counting on it while the
	// router finishes its last requests.
	if sn := a.Shardnode(); sn != nil {
		sn.Leaving(ctx)
	}
	var late []chan error
	for i := len(a.started) - 1; i >= 0; i-- {
		m := a.started[i]
		start := time.Now()
		if err := a.stopModule(ctx, m, &late); err != nil {
			errs = append(errs, fmt.Errorf("stop %s: %w", m.name, err))
		}
		// Which module holds a stop up is what an operator whose node was
		// killed at the end of its grace period needs to know.
		if took := time.Since(start); took >= slowStop {
			a.cfg.Logger.Info("module stopped", "module", m.name, "took", took.Round(time.Millisecond))
		}
	}
	a.started = nil
	for _, done := range late {
		select {
		case <-done: // its errors came too late to matter
		case <-ctx.Done():
		}
	}
	if a.ownTP != nil {
		errs = append(errs, a.ownTP.Shutdown(ctx)) // flush the last spans
		a.ownTP = nil
	}
	return errors.Join(errs...)
}

// Conn is the process's NATS connection (nil before Start).
func (a *App) Conn() *nats.Conn { return a.nc }

// ClientURL is where external clients reach NATS: the embedded server's
// address under targets all and nats, else the configured NATS URL.
func (a *App) ClientURL() string {
	if a.srv != nil {
		return a.srv.ClientURL()
	}
	return a.cfg.NATSURL
}

// ClusterAddr is the host:port the embedded server takes routes on (the
// address other members --join as nats://host:port), or "" when it is not a
// cluster member or not listening yet. Unlike the other accessors it may be
// called while Start runs: a first member's Start waits for a second member,
// which needs this address to join.
func (a *App) ClusterAddr() string {
	s, _ := a.clusterAddr.Load().(string)
	return s
}

// Config returns the effective configuration, defaults filled in.
func (a *App) Config() Config { return a.cfg }

// Projector returns the running projector, or nil when the target has none.
func (a *App) Projector() *projector.Service {
	for _, m := range a.started {
		if s, ok := m.svc.(*projector.Service); ok {
			return s
		}
	}
	return nil
}

// Shardnode returns the running shardnode service, or nil when the target
// has none. Status and tests read its stats.
func (a *App) Shardnode() *shardnode.Service {
	for _, m := range a.started {
		if s, ok := m.svc.(*shardnode.Service); ok {
			return s
		}
	}
	return nil
}

// Console returns the running web console, or nil when none is served.
func (a *App) Console() *console.Service {
	for _, m := range a.started {
		if c, ok := m.svc.(*consoleModule); ok && c.serving {
			return c.Service
		}
	}
	return nil
}
