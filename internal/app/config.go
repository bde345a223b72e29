// Package app wires Kuma's modules into a process, the way dskit-based
// systems do: modules.go names every module and what it depends on, a target
// names the modules to run (`all` is the single-process bundle), modules
// start in dependency order and stop in reverse, so the embedded NATS server
// stops last.
package app

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/services/console"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/kumadb/kuma/services/projector"
	"github.com/kumadb/kuma/services/router"
	"github.com/kumadb/kuma/services/shardnode"
	"go.opentelemetry.io/otel/trace"
)

// Config is everything a Kuma process needs. Its zero value plus DataDir is a
// working single-node store. Its flags, and those of the services' configs
// it composes, are registered in flags.go.
type Config struct {
	// Target is what the process runs (targets in modules.go): all (the
	// default, kuma up), router, shardnode, projector, keyvault, console,
	// or nats (the embedded NATS server alone).
	Target string
	// DataDir holds the shard files and the embedded server's JetStream store.
	DataDir string
	// Context is the served context and Shards its shard count: 0 (the
	// default) is what the context already has (its data dir's count, else
	// the cluster's), or DefaultShards for a new one (shardnode.Config).
	Context string
	Shards  int
	// NATS is the embedded server's settings (targets all and nats), with
	// their own flags and defaults (natsbus.ServerConfig's RegisterFlags):
	// where it listens, its largest message, and the NATS cluster it joins.
	// natsServerConfig hands them over whole, having filled in what the
	// process decides: StoreDir (<data>/nats), Logger, and a cluster
	// member's ServerName (NodeName); whatever is set in those fields here
	// is replaced. The rules that are Kuma's are checked in Validate:
	//   - Listen on a non-loopback address is refused unless Insecure is
	//     set: the embedded server has no authentication, so anyone who
	//     reaches it could read and erase everything. The cluster
	//     listener (ClusterListen) has none either, so the same holds.
	//   - MaxPayload is MinMaxPayload to MaxMaxPayload (0: natsbus's
	//     default). Every request and every answer must fit in it: larger
	//     answers are cut into pages or refused with payload_too_large
	//     (docs/protocol.md).
	//   - Routes (the --join values) list route URLs of running members,
	//     any of them: gossip finds the rest; they need ClusterListen, for
	//     the other members' routes, which alone makes this node the first
	//     member, whose JetStream waits for a second one.
	NATS natsbus.ServerConfig
	// Insecure allows NATS.Listen and NATS.ClusterListen on a non-loopback
	// address without authentication (`--insecure`), for a private network
	// or a container whose port only trusted peers reach.
	Insecure bool
	// Keyvault says whether target all runs a keyvault instance:
	// KeyvaultLocal (default) in this process, KeyvaultRemote none, using
	// the other nodes' over NATS as `kuma serve --target shardnode` does (a
	// node that is not to hold the master key). A single node keeps its keys
	// in <data>/keyvault/keys.db; a cluster member and `kuma serve --target
	// keyvault` keep them in the JetStream bucket KUMA_KEYS, which the
	// cluster replicates and every instance shares, so no node is the
	// keyvault's home (see keyvaultStore).
	Keyvault string
	// NATSURL is the external NATS to connect to (every target but all and
	// nats, which run the embedded server and connect to it in process).
	NATSURL string
	// NATSUser and NATSPassword, or NATSCredsFile (a .creds file), or
	// NATSNKeyFile (an NKey seed) authenticate this process to that NATS;
	// NATSTLSCA is the CA of its certificate, NATSTLSCert and NATSTLSKey
	// this process's client certificate. NATSInboxPrefix defaults to
	// _INBOX.<NATSUser>. See natsauth.go and deployments/nats/kuma.conf.
	NATSUser, NATSPassword, NATSCredsFile, NATSNKeyFile string
	NATSTLSCA, NATSTLSCert, NATSTLSKey, NATSInboxPrefix string
	// Durability is the context's acknowledgement rule: "local" (default,
	// after the local fsync) or "replicated" (once the event stream, which
	// the NATS cluster replicates, has the events too).
	Durability string
	// Shardnode, Projector, Router and Console are those services' own
	// settings, with their own defaults (the shardnode's SQLite synchronous
	// setting, snapshot interval, idle timeout and actor bounds, the
	// console's address...). build hands each to its service whole, having
	// filled in what the process gives every service: the context and its
	// shard count, DataDir, NodeName, the keyvault, the connection, Logger,
	// Now, the metrics registry and TracerProvider; whatever is set in
	// those fields here is replaced.
	Shardnode shardnode.Config
	Projector projector.Config
	Router    router.Config
	Console   console.Config
	// MasterKey is the keyvault's 32-byte master key; MasterKeyFile a file
	// holding it in base64. With neither, target all keeps a generated key in
	// <data>/keyvault/master.key and warns; the keyvault target refuses to
	// start (see masterKey). Only the keyvault module reads them.
	MasterKey     []byte
	MasterKeyFile string
	// Tracing says where spans go: "" (off), "otlp" (configured by the
	// standard OTEL_* variables) or "stdout". TracerProvider, when set,
	// overrides it (tests record spans with it).
	Tracing        telemetry.Exporter
	TracerProvider trace.TracerProvider
	// MetricsListen is where /metrics, /healthz and /readyz are served
	// (host:port; empty: not served).
	MetricsListen string
	// Pprof adds Go's profiles (/debug/pprof/) to MetricsListen, for an
	// operator profiling a node under load. Off by default: a profile shows
	// the process's internals and costs CPU while it runs.
	Pprof bool
	// ReadyMaxLag is how many stream messages a projection may be behind
	// while /readyz says ready (default 1,000).
	ReadyMaxLag int64
	// NodeName names this process in status, in the cluster and in the
	// projector's consumers (default: the host name made a valid node name,
	// cluster.DefaultNodeName). It is worked out once here and given to
	// every service, so that they all agree.
	NodeName string
	// Failpoint is the fault tests' hook of the shardnode and the
	// projector, and of the start ("start-before-shardnode": the modules
	// before it have started); nil in production.
	Failpoint func(name string)
	// ProjectionsFile declares read-model projections (YAML, see
	// pkg/projection); Projections adds or declares them in Go. The
	// built-in entities projection is always there.
	ProjectionsFile string
	Projections     []projection.Spec
	// Reducers maps a context to its reducer; absent means JSON Merge Patch.
	Reducers map[string]kuma.Reducer
	Logger   *slog.Logger
	Now      func() time.Time
}

// Defaults used by the CLI flags and by an empty Config.
const (
	DefaultDataDir    = "./data"
	DefaultShards     = shardnode.DefaultShards
	DefaultNATSListen = natsbus.DefaultListen
	DefaultNATSURL    = "nats://127.0.0.1:4222"
	// DefaultMetricsListen is where `kuma up` serves /metrics, /healthz and
	// /readyz (the port OpenTelemetry's Prometheus exporter uses).
	DefaultMetricsListen = "127.0.0.1:9464"
	// DefaultConsoleListen is where `kuma up` serves the web console.
	DefaultConsoleListen = "127.0.0.1:9480"
	// DefaultClusterName names the NATS cluster of `kuma up --join`.
	DefaultClusterName = natsbus.DefaultClusterName
)

// Bounds of NATS.MaxPayload (--max-payload).
const (
	MinMaxPayload = 128 << 10
	MaxMaxPayload = 64 << 20
)

// Where the keyvault of target all runs (Config.Keyvault).
const (
	KeyvaultLocal  = "local"
	KeyvaultRemote = "remote"
)

func (c *Config) setDefaults() {
	if c.Target == "" {
		c.Target = TargetAll
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.Context == "" {
		c.Context = kuma.DefaultContext
	}
	if c.NATS.Listen == "" {
		c.NATS.Listen = DefaultNATSListen
	}
	if c.NATSURL == "" {
		c.NATSURL = DefaultNATSURL
	}
	if c.Durability == "" {
		c.Durability = shardnode.DurabilityLocal
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.NodeName == "" {
		c.NodeName = cluster.DefaultNodeName()
	}
	if c.ReadyMaxLag == 0 {
		c.ReadyMaxLag = 1000
	}
	if c.NATS.ClusterName == "" {
		c.NATS.ClusterName = DefaultClusterName
	}
	if c.Keyvault == "" {
		c.Keyvault = KeyvaultLocal
	}
}

// embedded reports whether the target runs the embedded NATS server.
func (c *Config) embedded() bool { return slices.Contains(order(c.Target), ModuleNATSServer) }

// clustered reports whether the embedded server joins a NATS cluster.
func (c *Config) clustered() bool {
	return c.NATS.Clustered() || c.NATS.ClusterAdvertise != ""
}

// keyvaultStore is where this process's keyvault keeps its keys. A single
// `kuma up` keeps the local file: it has one keyvault and one disk, the
// file costs a few fsyncs per thousand new keys (group commit) where the
// bucket costs a JetStream round trip per key, and a standalone embedded
// server does not replicate anyway. A cluster member, and the keyvault
// target run apart against an external NATS, use the JetStream bucket, so
// that any number of instances on any nodes share the keys and losing a
// node loses no keyvault. A file with keys left from before is imported
// into the bucket at start.
func (c *Config) keyvaultStore() string {
	if c.Target == TargetAll && !c.clustered() {
		return keyvault.StoreFile
	}
	return keyvault.StoreJetStream
}

// natsServerConfig is the embedded server's configuration: NATS, with what
// the process decides filled in. A standalone server keeps nats-server's
// name "kuma" as it always had, and takes no cluster name, which only a
// cluster member uses; a cluster member is named NodeName, which is unique
// in the cluster already.
func (c *Config) natsServerConfig() natsbus.ServerConfig {
	sc := c.NATS
	sc.StoreDir = filepath.Join(c.DataDir, "nats")
	sc.Logger = c.Logger
	sc.ServerName = ""
	if c.clustered() {
		sc.ServerName = c.NodeName
	} else {
		sc.ClusterName = ""
	}
	return sc
}

// Validate reports every problem at once, each with its fix, naming the flag
// to change: it runs in New, before anything starts, and checks what the
// flags set for every target. The rules shared with the services
// (kuma.ValidateContext, cluster.ValidateNode, shardnode.ValidateShards and
// ValidateDurability) are theirs, called here, not copied. Each service's
// own Validate then checks its whole Config, wiring included, in build;
// a check only a service makes (one that needs no flag name) belongs there.
func (c *Config) Validate() error {
	var errs []error
	if err := cluster.ValidateNode(c.NodeName); err != nil {
		errs = append(errs, fmt.Errorf("--node: %w", err))
	}
	if _, ok := targets[c.Target]; !ok {
		errs = append(errs, fmt.Errorf("target %q is unknown; use one of %v", c.Target, targetNames()))
	}
	if err := kuma.ValidateContext(c.Context); err != nil {
		errs = append(errs, fmt.Errorf("--context: %w", err))
	}
	if c.Shards != 0 { // 0: what the context has (shardnode.ContextConfig)
		if err := shardnode.ValidateShards(c.Shards); err != nil {
			errs = append(errs, fmt.Errorf("--%w", err))
		}
	}
	if c.Console.Listen != "" {
		if _, _, err := net.SplitHostPort(c.Console.Listen); err != nil {
			errs = append(errs, fmt.Errorf("--console-listen %q: want host:port such as %s", c.Console.Listen, DefaultConsoleListen))
		}
	} else if c.Target == ModuleConsole {
		errs = append(errs, fmt.Errorf("target console needs --console-listen (host:port such as %s)", DefaultConsoleListen))
	}
	if c.embedded() && !c.Insecure && !natsbus.LoopbackListen(c.NATS.Listen) {
		errs = append(errs, fmt.Errorf("--nats-listen %s is not a loopback address, and the embedded NATS server has no authentication: "+
			"anyone who reaches it could read and erase everything; listen on 127.0.0.1, or pass --insecure (KUMA_INSECURE=true) "+
			"if only trusted peers can reach it", c.NATS.Listen))
	}
	if c.NATS.MaxPayload != 0 && (c.NATS.MaxPayload < MinMaxPayload || c.NATS.MaxPayload > MaxMaxPayload) {
		errs = append(errs, fmt.Errorf("--max-payload must be %d (128 KiB, room for one event of 64 KiB) to %d (64 MiB, NATS's own ceiling), got %d",
			MinMaxPayload, MaxMaxPayload, c.NATS.MaxPayload))
	}
	if c.NATS.MaxPayload != 0 && !c.embedded() {
		errs = append(errs, fmt.Errorf("--max-payload sets the embedded NATS server's, which target %s does not run; set max_payload in the NATS server's own configuration", c.Target))
	}
	errs = append(errs, c.validateCluster()...)
	if err := c.validateNATSAuth(); err != nil {
		errs = append(errs, err)
	}
	switch c.Keyvault {
	case KeyvaultLocal:
	case KeyvaultRemote:
		if c.Target != TargetAll {
			errs = append(errs, fmt.Errorf("--keyvault %s is for kuma up (target all); other targets never run a keyvault beside their service", c.Keyvault))
		}
	default:
		errs = append(errs, fmt.Errorf("--keyvault must be %s (run it in this process) or %s (use the cluster's, over NATS), got %q", KeyvaultLocal, KeyvaultRemote, c.Keyvault))
	}
	if err := shardnode.ValidateDurability(c.Durability); err != nil {
		errs = append(errs, fmt.Errorf("--%w", err))
	}
	switch c.Shardnode.Synchronous {
	case "", sqlite.SyncFull, sqlite.SyncNormal, sqlite.SyncOff: // "": the shardnode's default, FULL
	default:
		errs = append(errs, fmt.Errorf("--sync must be FULL or NORMAL, got %q", c.Shardnode.Synchronous))
	}
	return errors.Join(errs...)
}

// validateCluster checks the cluster settings of the embedded server.
func (c *Config) validateCluster() []error {
	if !c.clustered() {
		return nil
	}
	if !c.embedded() {
		return []error{fmt.Errorf("--join and --cluster-listen are for kuma up and kuma serve --target nats (the embedded NATS server); target %s joins a NATS cluster through --nats-url", c.Target)}
	}
	var errs []error
	if len(c.NATS.Routes) > 0 && c.NATS.ClusterListen == "" {
		// natsbus says so too, in its own terms; this one names the flags.
		errs = append(errs, errors.New("--join needs --cluster-listen: the host:port this node takes routes on, reachable by the other members "+
			"(such as 0.0.0.0:6222), since the members found through the cluster dial back to it"))
	} else if err := c.natsServerConfig().Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.NATS.ClusterListen != "" && !c.Insecure && !natsbus.LoopbackListen(c.NATS.ClusterListen) {
		errs = append(errs, fmt.Errorf("--cluster-listen %s is not a loopback address, and the embedded server's routes have no authentication: "+
			"anyone who reaches it could join the cluster and read and erase everything; listen on 127.0.0.1, or pass --insecure "+
			"(KUMA_INSECURE=true) if only trusted peers can reach it", c.NATS.ClusterListen))
	}
	return errs
}
