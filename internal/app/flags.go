package app

import (
	"flag"
	"fmt"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/services/shardnode"
)

// Flags, the way Loki's modules register theirs: each component's Config
// registers its own flags with their defaults and help (shardnode.Config,
// console.Config, the embedded server's natsbus.ServerConfig), and Config
// composes them beside the process's own. A new
// setting of a component is a field, a flag and a default in that
// component's Config; the Config here carries it whole to the service (see
// build and natsServerConfig), so nothing is copied field by field. The defaults are those
// setDefaults fills in (TestFlagDefaultsAreConfigDefaults), so a Config
// built in Go and one read from flags agree.

// RegisterFlags registers the flags kuma up and kuma serve share: the
// process's own and those of the composed components, the embedded NATS
// server's included (kuma serve runs it with --target nats).
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.DataDir, "data", DefaultDataDir, "data directory (shard files, NATS store)")
	fs.IntVar(&c.Shards, "shards", 0, fmt.Sprintf("shards of the context, fixed when it is created; 0: what the context has (its data dir's, else the cluster's), %d for a new one", DefaultShards))
	fs.StringVar(&c.Context, "context", kuma.DefaultContext, "context to serve")
	fs.StringVar(&c.MasterKeyFile, "master-key-file", "", "file holding the keyvault's master key (base64 of 32 bytes); or set KUMA_MASTER_KEY")
	fs.BoolVar(&c.Insecure, "insecure", false, "let the embedded NATS server listen on a non-loopback address without authentication (trusted networks only)")
	fs.StringVar(&c.ProjectionsFile, "projections", "", "YAML file declaring read-model projections (see docs/projections.md)")
	fs.StringVar(&c.NodeName, "node", "", "this node's name, unique in the cluster (default: the host name)")
	fs.StringVar(&c.Durability, "durability", shardnode.DurabilityLocal, "when an append is acknowledged: local (after this node's fsync) or replicated (once the replicated event stream has it too; see docs/cluster.md)")
	fs.StringVar(&c.MetricsListen, "metrics-listen", "", "host:port for /metrics, /healthz and /readyz (empty: off)")
	fs.BoolVar(&c.Pprof, "pprof", false, "also serve Go's profiles under /debug/pprof/ on --metrics-listen (for profiling a node under load)")
	fs.BoolFunc("trace-stdout", "print spans to stdout (debugging); OTLP export is configured by OTEL_* variables", func(string) error {
		c.Tracing = telemetry.ExportStdout
		return nil
	})
	c.NATS.RegisterFlags(fs)
	c.Shardnode.RegisterFlags(fs)
	c.Console.RegisterFlags(fs)
}

// RegisterUpFlags registers the flags of kuma up (target all): those of
// RegisterFlags and --keyvault.
func (c *Config) RegisterUpFlags(fs *flag.FlagSet) {
	c.RegisterFlags(fs)
	fs.StringVar(&c.Keyvault, "keyvault", KeyvaultLocal, "local: run a keyvault instance in this process (in a cluster, on the replicated bucket KUMA_KEYS that every instance shares); remote: run none here and use the other nodes' over NATS (a node that is not to hold the master key)")
}

// RegisterServeFlags registers the flags of kuma serve: those of
// RegisterFlags, --target and the external NATS's (URL, credentials, TLS).
func (c *Config) RegisterServeFlags(fs *flag.FlagSet) {
	c.RegisterFlags(fs)
	fs.StringVar(&c.Target, "target", "", "service to run: router, shardnode, projector, keyvault, console, or nats (the embedded NATS server alone; all = kuma up)")
	fs.StringVar(&c.NATSURL, "nats-url", DefaultNATSURL, "NATS server to connect to")
	c.RegisterNATSAuthFlags(fs)
}

// RegisterNATSAuthFlags registers the flags that authenticate to an
// external NATS and secure the connection with TLS (kuma serve and the
// client commands; see deployments/nats/kuma.conf and natsauth.go). Like
// every flag, each has its KUMA_* variable; the password belongs there,
// KUMA_NATS_PASSWORD, not on the command line, where ps shows it.
func (c *Config) RegisterNATSAuthFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.NATSUser, "nats-user", "", "NATS user (kuma.conf has client, console, ops, router, shardnode, projector, keyvault)")
	fs.StringVar(&c.NATSPassword, "nats-password", "", "NATS password; prefer KUMA_NATS_PASSWORD (flags show in ps)")
	fs.StringVar(&c.NATSCredsFile, "nats-creds", "", "NATS credentials file (JWT and NKey seed), instead of a user and password")
	fs.StringVar(&c.NATSNKeyFile, "nats-nkey", "", "NKey seed file of the NATS user, instead of a user and password")
	fs.StringVar(&c.NATSTLSCA, "nats-tls-ca", "", "CA certificate (PEM) that signed the NATS server's certificate")
	fs.StringVar(&c.NATSTLSCert, "nats-tls-cert", "", "client certificate (PEM) for NATS servers that verify clients")
	fs.StringVar(&c.NATSTLSKey, "nats-tls-key", "", "key (PEM) of --nats-tls-cert")
	fs.StringVar(&c.NATSInboxPrefix, "nats-inbox-prefix", "", "reply inbox prefix (default _INBOX.<nats-user>; kuma.conf lets a user read only its own)")
}
