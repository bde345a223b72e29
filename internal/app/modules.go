package app

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"syscall"
	"time"

	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/console"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/kumadb/kuma/services/projector"
	"github.com/kumadb/kuma/services/router"
	"github.com/kumadb/kuma/services/shardnode"
	"github.com/nats-io/nats.go"
)

// Module and target names.
const (
	ModuleNATSServer = "nats-server" // the embedded server
	ModuleNATSConn   = "nats"        // this process's connection
	ModuleRouter     = "router"
	ModuleShardnode  = "shardnode"
	ModuleKeyvault   = "keyvault"
	ModuleProjector  = "projector"
	ModuleOps        = "ops"     // /metrics, /healthz, /readyz
	ModuleConsole    = "console" // the web console, when Console.Listen is set
	TargetAll        = "all"
	// TargetNATS runs the embedded NATS server alone (`kuma serve --target
	// nats`), a cluster member with JetStream through the same --join and
	// --cluster-listen as kuma up, for services run apart to connect to.
	// It shares its name with the connection module, which every target
	// has anyway.
	TargetNATS = "nats"
)

// deps is the module graph: each module and what must run before it.
var deps = map[string][]string{
	ModuleNATSServer: nil,
	ModuleNATSConn:   nil, // plus ModuleNATSServer when it is in the target
	ModuleRouter:     {ModuleNATSConn},
	ModuleShardnode:  {ModuleNATSConn},
	ModuleKeyvault:   {ModuleNATSConn},
	ModuleProjector:  {ModuleNATSConn},
	ModuleOps:        {ModuleNATSConn},
	ModuleConsole:    {ModuleNATSConn},
}

// targets are what `kuma serve --target` accepts; all is `kuma up`. Shards
// start before routers so nothing is forwarded to a shard that is not open,
// and routers stop first. The console starts last, once there is something
// to show, and stops first.
var targets = map[string][]string{
	TargetAll:       {ModuleNATSServer, ModuleKeyvault, ModuleShardnode, ModuleProjector, ModuleRouter, ModuleConsole},
	ModuleConsole:   {ModuleConsole},
	ModuleProjector: {ModuleProjector},
	ModuleRouter:    {ModuleRouter},
	ModuleShardnode: {ModuleShardnode},
	ModuleKeyvault:  {ModuleKeyvault},
	TargetNATS:      {ModuleNATSServer},
}

func targetNames() []string {
	names := make([]string, 0, len(targets))
	for n := range targets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// service is the lifecycle every module has.
type service interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// order returns the target's modules with their dependencies, each after
// what it depends on.
func order(target string) []string {
	var out []string
	var visit func(string)
	visit = func(m string) {
		if slices.Contains(out, m) {
			return
		}
		for _, d := range deps[m] {
			visit(d)
		}
		out = append(out, m)
	}
	for _, m := range targets[target] {
		visit(m)
	}
	// Every target serves its metrics and health, once everything else runs
	// (and stops serving them first).
	visit(ModuleOps)
	// The connection must follow the embedded server when both run.
	if i := slices.Index(out, ModuleNATSServer); i > 0 {
		out = append([]string{ModuleNATSServer}, slices.Delete(out, i, i+1)...)
	}
	return out
}

// build makes the service of one module; it may use what earlier modules set
// on the App.
func (a *App) build(module string) (service, error) {
	cfg := a.cfg
	switch module {
	case ModuleNATSServer:
		return &natsServerModule{app: a}, nil
	case ModuleNATSConn:
		return &natsConnModule{app: a}, nil
	case ModuleRouter:
		rc := cfg.Router
		rc.Contexts = map[string]int{cfg.Context: a.shardCount()}
		rc.Registerer = a.registry
		rc.TracerProvider = cfg.TracerProvider
		rc.Logger = cfg.Logger.With("service", "router")
		return router.New(rc, a.nc)
	case ModuleKeyvault:
		if cfg.Keyvault == KeyvaultRemote {
			// No instance here: the shardnode and projector reach the
			// other nodes' keyvaults over NATS (a.vault stays nil). For a
			// node that is not to hold the master key.
			return offModule{}, nil
		}
		key, err := a.masterKey()
		if err != nil {
			return nil, err
		}
		kv, err := keyvault.New(keyvault.Config{
			Store: cfg.keyvaultStore(),
			// The file store's file; for the JetStream store, a file
			// whose keys are imported into the bucket at start.
			Path:      filepath.Join(cfg.DataDir, "keyvault", "keys.db"),
			MasterKey: key,
			Logger:    cfg.Logger.With("service", "keyvault"),
			Now:       cfg.Now,
		}, a.nc)
		if err != nil {
			return nil, err
		}
		a.vault = kv
		return kv, nil
	case ModuleOps:
		return &opsModule{app: a}, nil
	case ModuleConsole:
		if cfg.Console.Listen == "" {
			return offModule{}, nil // target all without a console
		}
		cc := cfg.Console
		cc.Context = cfg.Context
		cc.Shards = a.shardCount()
		cc.Gatherer = a.registry
		cc.NodeName = cfg.NodeName
		cc.Logger = cfg.Logger.With("service", "console")
		cc.Now = cfg.Now
		svc, err := console.New(cc, a.nc)
		if err != nil {
			return nil, err
		}
		return &consoleModule{Service: svc, app: a}, nil
	case ModuleProjector:
		var keys projector.KeyVault = vaultclient.New(a.nc, 0)
		if a.vault != nil {
			keys = a.vault
		}
		pc := cfg.Projector
		pc.Context = cfg.Context
		pc.Reducer = cfg.Reducers[cfg.Context]
		pc.DataDir = cfg.DataDir
		pc.NodeName = cfg.NodeName
		pc.Specs = a.specs
		pc.Keys = keys
		if a.shards != nil {
			// The shardnode of this process (built before the projector,
			// see targets) holds the keys it seals with; the projector
			// opens the same entities' events, so it shares that cache
			// rather than hold every key a second time. Both reach the
			// same keyvault (in process, or over this connection).
			pc.KeyCache = a.shards.KeyCache().Share()
		}
		pc.Dial = a.dial
		pc.Failpoint = cfg.Failpoint
		pc.Registerer = a.registry
		pc.TracerProvider = cfg.TracerProvider
		pc.Logger = cfg.Logger.With("service", "projector")
		pc.Now = cfg.Now
		return projector.New(pc, a.nc)
	case ModuleShardnode:
		// In one process the shardnode calls the keyvault directly; alone,
		// it reaches a keyvault over NATS.
		var keys shardnode.KeyVault = vaultclient.New(a.nc, 0)
		if a.vault != nil {
			keys = a.vault
		}
		sc := cfg.Shardnode
		sc.Keys = keys
		sc.Failpoint = cfg.Failpoint
		sc.NodeName = cfg.NodeName
		sc.Registerer = a.registry
		sc.TracerProvider = cfg.TracerProvider
		sc.DataDir = cfg.DataDir
		sc.Contexts = []shardnode.ContextConfig{{
			Name: cfg.Context, Shards: cfg.Shards, Reducer: cfg.Reducers[cfg.Context], Durability: cfg.Durability,
		}}
		sc.Logger = cfg.Logger.With("service", "shardnode")
		sc.Now = cfg.Now
		sn, err := shardnode.New(sc, a.nc)
		if err != nil {
			return nil, err
		}
		a.shards = sn
		return sn, nil
	}
	return nil, fmt.Errorf("app: no module %q", module)
}

// offModule stands for a module the configuration leaves off.
type offModule struct{}

func (offModule) Start(context.Context) error { return nil }
func (offModule) Stop(context.Context) error  { return nil }

// consoleModule runs the web console. At the default address it is a
// convenience, not a duty: when another process (often another kuma up)
// holds the port, the console is left off with a warning instead of failing
// the start. An address given on purpose must be free.
type consoleModule struct {
	*console.Service
	app     *App
	serving bool
}

func (m *consoleModule) Start(ctx context.Context) error {
	err := m.Service.Start(ctx)
	if err != nil && m.app.cfg.Console.Listen == DefaultConsoleListen && errors.Is(err, syscall.EADDRINUSE) {
		m.app.cfg.Logger.Warn("console not served: its default address is in use; give --console-listen host:port",
			"addr", DefaultConsoleListen)
		return nil
	}
	m.serving = err == nil
	return err
}

func (m *consoleModule) Stop(ctx context.Context) error {
	if !m.serving {
		return nil
	}
	return m.Service.Stop(ctx)
}

// natsServerModule runs the embedded nats-server with JetStream under
// <data>/nats.
type natsServerModule struct{ app *App }

func (m *natsServerModule) Start(ctx context.Context) error {
	srv, err := natsbus.StartServer(ctx, m.app.cfg.natsServerConfig())
	if err != nil {
		return err
	}
	m.app.srv = srv
	if addr := srv.ClusterAddr(); addr != nil {
		m.app.clusterAddr.Store(addr.String())
	}
	return nil
}

func (m *natsServerModule) Stop(ctx context.Context) error {
	if srv := m.app.srv; srv != nil {
		srv.Shutdown()
		srv.WaitForShutdown()
	}
	return nil
}

// natsConnModule is this process's one NATS connection: in-process to the
// embedded server when there is one, else to NATSURL.
type natsConnModule struct{ app *App }

func (m *natsConnModule) Start(ctx context.Context) error {
	nc, err := m.app.dial()
	if err != nil {
		return err
	}
	m.app.nc = nc
	if m.app.srv == nil {
		return nil
	}
	if err := m.app.startJetStream(ctx); err != nil {
		return errors.Join(err, m.Stop(ctx)) // not started: Stop would skip it
	}
	return nil
}

// startJetStream readies the embedded server's JetStream for the modules
// that follow: for a standalone server there is nothing to wait for (but a
// pending export of a conversion is refused); a cluster member waits for
// the cluster's JetStream to answer,
// restores the streams of a standalone run that StartServer exported
// (natsbus, standalone.go) and, on a member, waits while another member
// restores its own, so that no module creates Kuma's streams empty before.
func (a *App) startJetStream(ctx context.Context) error {
	storeDir := a.cfg.natsServerConfig().StoreDir
	pending := natsbus.PendingExport(storeDir)
	if pending && !a.cfg.clustered() {
		// Its store was started clustered (it has a meta group), so streams
		// restored into it standalone would be deleted as orphans at the
		// next clustered start.
		return fmt.Errorf("app: %s holds this node's standalone streams, exported to carry them into a cluster: start it with --cluster-listen again to finish, or, to stay standalone, stop, move %s away, rename %s to jetstream and remove %s",
			storeDir, filepath.Join(storeDir, "jetstream"), filepath.Join(storeDir, "jetstream.standalone"), filepath.Join(storeDir, "standalone-export"))
	}
	if !a.cfg.clustered() {
		return nil
	}
	if pending {
		// Before the wait: a member joining must see this answer before
		// its JetStream, which needs this node's vote, can answer it. It
		// answers until every module of this node has started (App.Start),
		// not only until the streams are restored: the leases restored
		// with them name this node, which is not yet heartbeating, and a
		// member starting meanwhile would take its shards over as from a
		// dead node, without the events this node acknowledged standalone
		// but had not published (kill -9, local durability).
		stop, err := natsbus.ServeConversion(a.nc, a.cfg.NodeName)
		if err != nil {
			return err
		}
		a.endConversion = stop
	}
	if err := a.waitJetStream(ctx); err != nil {
		return err
	}
	if pending {
		names, err := natsbus.RestoreExport(ctx, a.nc, storeDir, a.cfg.Logger)
		if err != nil {
			return err
		}
		a.cfg.Logger.Info("carried the standalone node's streams into the cluster", "streams", names)
		return nil
	}
	return natsbus.WaitConversions(ctx, a.nc, a.cfg.Logger)
}

// waitJetStream holds the start of the modules that need JetStream (all that
// follow) until the embedded cluster member's JetStream answers, or ctx ends.
// A first member's answers only once a second member has joined.
func (a *App) waitJetStream(ctx context.Context) error {
	log := a.cfg.Logger
	if len(a.cfg.NATS.Routes) == 0 {
		log.Info("first cluster member: JetStream waits for a second member to join; start another node with --join",
			"join", "nats://"+a.ClusterAddr(), "cluster", a.cfg.NATS.ClusterName)
	} else {
		log.Debug("waiting for the cluster's JetStream", "join", a.cfg.NATS.Routes)
	}
	if err := natsbus.WaitJetStream(ctx, a.nc); err != nil {
		return err
	}
	log.Info("cluster JetStream ready", "node", a.cfg.NodeName, "cluster", a.cfg.NATS.ClusterName)
	return nil
}

// dial opens a NATS connection of this process: in-process to the embedded
// server when there is one, else to NATSURL. The projector opens one per
// subscriber with it.
func (a *App) dial() (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name("kuma-" + a.cfg.Target),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
	}
	url := a.cfg.NATSURL
	if srv := a.srv; srv != nil {
		opts = append(opts, nats.InProcessServer(srv))
		url = srv.ClientURL()
	} else {
		opts = append(opts, nats.RetryOnFailedConnect(true))
	}
	opts = append(opts, a.cfg.natsAuth()) // credentials and TLS, natsauth.go
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("nats: connect to %s: %w", url, err)
	}
	return nc, nil
}

func (m *natsConnModule) Stop(ctx context.Context) error {
	if nc := m.app.nc; nc != nil {
		nc.Close()
	}
	return nil
}

// shardCount is the context's shard count for the router and the console:
// the one this process's shardnode resolved, or the configured one (0: the
// router asks a shardnode, the console counts what status shows).
func (a *App) shardCount() int {
	if a.shards != nil {
		if n := a.shards.Shards(a.cfg.Context); n > 0 {
			return n
		}
	}
	return a.cfg.Shards
}
