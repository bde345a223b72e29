package main

import (
	"flag"

	"github.com/kumadb/kuma/internal/app"
)

// natsAuthFlags registers the flags that authenticate to an external NATS
// and secure the connection with TLS (kuma serve and the client commands;
// see deployments/nats/kuma.conf). Like every flag, each has its KUMA_*
// variable; the password belongs there, KUMA_NATS_PASSWORD, not on the
// command line, where ps shows it.
func natsAuthFlags(fs *flag.FlagSet, cfg *app.Config) {
	fs.StringVar(&cfg.NATSUser, "nats-user", "", "NATS user (kuma.conf has client, console, ops, router, shardnode, projector, keyvault)")
	fs.StringVar(&cfg.NATSPassword, "nats-password", "", "NATS password; prefer KUMA_NATS_PASSWORD (flags show in ps)")
	fs.StringVar(&cfg.NATSCredsFile, "nats-creds", "", "NATS credentials file (JWT and NKey seed), instead of a user and password")
	fs.StringVar(&cfg.NATSNKeyFile, "nats-nkey", "", "NKey seed file of the NATS user, instead of a user and password")
	fs.StringVar(&cfg.NATSTLSCA, "nats-tls-ca", "", "CA certificate (PEM) that signed the NATS server's certificate")
	fs.StringVar(&cfg.NATSTLSCert, "nats-tls-cert", "", "client certificate (PEM) for NATS servers that verify clients")
	fs.StringVar(&cfg.NATSTLSKey, "nats-tls-key", "", "key (PEM) of --nats-tls-cert")
	fs.StringVar(&cfg.NATSInboxPrefix, "nats-inbox-prefix", "", "reply inbox prefix (default _INBOX.<nats-user>; kuma.conf lets a user read only its own)")
}
