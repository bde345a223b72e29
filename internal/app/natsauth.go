package app

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"
)

// The NATS* credential and TLS fields of Config are how a process joins a
// NATS that authenticates its users (deployments/nats/kuma.conf, described
// in docs/security.md): kuma serve uses them for every connection it opens,
// and the CLI's client commands for theirs. They do not apply to the
// embedded server of target all, which has no users.

// natsToken is one subject token, the shape a user name must have to give
// the inbox prefix _INBOX.<user>.
var natsToken = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// natsAuthSet reports whether any credential or TLS field is set.
func (c *Config) natsAuthSet() bool {
	return c.NATSUser != "" || c.NATSPassword != "" || c.NATSCredsFile != "" || c.NATSNKeyFile != "" ||
		c.NATSTLSCA != "" || c.NATSTLSCert != "" || c.NATSTLSKey != "" || c.NATSInboxPrefix != ""
}

// NATSInbox is the inbox prefix of the connection: NATSInboxPrefix, else
// _INBOX.<NATSUser> when the user name is one subject token (kuma.conf lets
// each user subscribe to its own _INBOX.<user>.> only), else nats.go's
// default, _INBOX.
func (c *Config) NATSInbox() string {
	switch {
	case c.NATSInboxPrefix != "":
		return c.NATSInboxPrefix
	case natsToken.MatchString(c.NATSUser):
		return "_INBOX." + c.NATSUser
	}
	return nats.InboxPrefix[:len(nats.InboxPrefix)-1]
}

// NATSOptions returns the nats.go options that authenticate a connection
// (a user and password, a credentials file or an NKey seed file) and secure
// it with TLS (a CA to trust, a client certificate), plus the inbox prefix
// and, when Logger is set, handlers that log what the server refuses (a
// permissions violation is reported only that way) and why connecting
// fails (a refused certificate or password). It reads
// and checks every file it names, so a mistake is reported, with its fix,
// before a connection is tried. With no field set it returns nothing.
func (c *Config) NATSOptions() ([]nats.Option, error) {
	if !c.natsAuthSet() {
		return nil, nil
	}
	var opts []nats.Option
	var errs []error
	methods := 0
	for _, set := range []bool{c.NATSUser != "" || c.NATSPassword != "", c.NATSCredsFile != "", c.NATSNKeyFile != ""} {
		if set {
			methods++
		}
	}
	if methods > 1 {
		errs = append(errs, errors.New("give one of --nats-user/--nats-password, --nats-creds and --nats-nkey, not several"))
	}
	switch {
	case c.NATSPassword != "" && c.NATSUser == "":
		errs = append(errs, errors.New("--nats-password (KUMA_NATS_PASSWORD) needs --nats-user"))
	case c.NATSUser != "":
		opts = append(opts, nats.UserInfo(c.NATSUser, c.NATSPassword))
	}
	if c.NATSCredsFile != "" {
		if b, err := os.ReadFile(c.NATSCredsFile); err != nil {
			errs = append(errs, fmt.Errorf("--nats-creds: %w", err))
		} else if !strings.Contains(string(b), "BEGIN NATS USER JWT") {
			errs = append(errs, fmt.Errorf("--nats-creds %s is not a NATS credentials file (nsc generate creds writes one)", c.NATSCredsFile))
		} else {
			opts = append(opts, nats.UserCredentials(c.NATSCredsFile))
		}
	}
	if c.NATSNKeyFile != "" {
		o, err := nats.NkeyOptionFromSeed(c.NATSNKeyFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("--nats-nkey %s: %w (want a user seed, SU..., as nsc or nk -gen user writes)", c.NATSNKeyFile, err))
		} else {
			opts = append(opts, o)
		}
	}
	if c.NATSTLSCA != "" || c.NATSTLSCert != "" || c.NATSTLSKey != "" {
		tc, err := c.natsTLS()
		if err != nil {
			errs = append(errs, err)
		} else {
			opts = append(opts, nats.Secure(tc))
		}
	}
	if p := c.NATSInbox(); strings.HasSuffix(p, ".") || slices.ContainsFunc(strings.Split(p, "."), func(t string) bool {
		return !natsToken.MatchString(t)
	}) {
		errs = append(errs, fmt.Errorf("--nats-inbox-prefix %q: want subject tokens of letters, digits, _ and - joined by dots, such as _INBOX.%s", p, "client"))
	} else {
		opts = append(opts, nats.CustomInboxPrefix(p))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if log := c.Logger; log != nil {
		user := c.NATSUser
		opts = append(opts, nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Error("nats: the server refused an operation", "user", user, "subject", subject, "err", err)
		}))
		// A refused certificate or password shows only as failed
		// (re)connections; say why once per new reason, not every attempt.
		var mu sync.Mutex
		last := ""
		opts = append(opts, nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			mu.Lock()
			defer mu.Unlock()
			if err == nil || err.Error() == last {
				return
			}
			last = err.Error()
			log.Warn("nats: cannot connect; retrying", "user", user, "err", err)
		}))
	}
	return opts, nil
}

// natsTLS builds the client TLS configuration: the CA that signed the
// server's certificate (default: the system's roots) and the client
// certificate kuma.conf requires (verify: true).
func (c *Config) natsTLS() (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	var errs []error
	if c.NATSTLSCA != "" {
		pem, err := os.ReadFile(c.NATSTLSCA)
		if err != nil {
			errs = append(errs, fmt.Errorf("--nats-tls-ca: %w", err))
		} else {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				errs = append(errs, fmt.Errorf("--nats-tls-ca %s holds no PEM certificate", c.NATSTLSCA))
			}
			tc.RootCAs = pool
		}
	}
	switch {
	case (c.NATSTLSCert == "") != (c.NATSTLSKey == ""):
		errs = append(errs, errors.New("--nats-tls-cert and --nats-tls-key go together: give both (the client certificate and its key) or neither"))
	case c.NATSTLSCert != "":
		cert, err := tls.LoadX509KeyPair(c.NATSTLSCert, c.NATSTLSKey)
		if err != nil {
			errs = append(errs, fmt.Errorf("--nats-tls-cert/--nats-tls-key: %w", err))
		} else {
			tc.Certificates = []tls.Certificate{cert}
		}
	}
	return tc, errors.Join(errs...)
}

// validateNATSAuth is Validate's part for the NATS* fields.
func (c *Config) validateNATSAuth() error {
	if !c.natsAuthSet() {
		return nil
	}
	if slices.Contains(order(c.Target), ModuleNATSServer) {
		return fmt.Errorf("target %s runs the embedded NATS server, which has no users: NATS credentials and TLS "+
			"(--nats-user, --nats-creds, --nats-tls-*, ...) apply to kuma serve with --nats-url", c.Target)
	}
	_, err := c.NATSOptions()
	return err
}

// natsAuth is NATSOptions as one option, so that dial applies it in one
// place and a problem (a file gone since Validate) is the error of
// nats.Connect.
func (c *Config) natsAuth() nats.Option {
	return func(o *nats.Options) error {
		opts, err := c.NATSOptions()
		if err != nil {
			return err
		}
		for _, opt := range opts {
			if err := opt(o); err != nil {
				return err
			}
		}
		return nil
	}
}
