// Package natsconf_test runs deployments/nats/kuma.conf in a real
// nats-server and holds it to its promises: Kuma's services work with the
// least rights it gives them, every user is refused everything else, and no
// connection gets in without TLS, a client certificate and its password.
package natsconf_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// bound limits every wait for something that must happen; it is reached
// only when the test is failing.
const bound = 15 * time.Second

// env is one nats-server run from kuma.conf, with its PKI.
type env struct {
	dir       string
	conf      string // kuma.conf plus the test's observer user
	ca        *ca
	client    leaf
	url       string
	srv       *server.Server
	log       *serverLog
	passwords map[string]string
	logs      map[string]*kumatest.LogBuffer // each Kuma service's
}

func TestProductionConfig(t *testing.T) {
	e := newEnv(t)
	var total, denied int
	t.Run("permission matrix", func(t *testing.T) { total, denied = e.matrix(t) })
	mark := e.log.len()
	// Each service runs as its own process would, with its own user; they
	// stop when the test ends.
	apps := map[string]*app.App{}
	for _, target := range []string{"keyvault", "shardnode", "projector", "router", "console"} {
		apps[target] = e.startKuma(t, target)
	}
	t.Run("happy path over TLS", func(t *testing.T) { e.happyPath(t, apps["console"]) })
	t.Run("the happy path needed no more rights", func(t *testing.T) {
		if v := e.log.since(mark, "Violation"); len(v) > 0 {
			t.Errorf("the server refused %d operations on the happy path; kuma.conf misses a right:\n%s",
				len(v), strings.Join(v, "\n"))
		}
	})
	t.Run("reply subjects cannot borrow a service's rights", e.replyInjection)
	t.Run("connections refused", e.refused)
	t.Run("cluster routes need the CA", e.routes)
	if !t.Failed() {
		t.Logf("permission matrix cells checked %d, %d denied and %d allowed, all as kuma.conf promises", total, denied, total-denied)
	}
}

func newEnv(t *testing.T) *env {
	dir := t.TempDir()
	e := &env{dir: dir, passwords: map[string]string{}, logs: map[string]*kumatest.LogBuffer{}}
	t.Cleanup(func() {
		if t.Failed() {
			for name, l := range e.logs {
				t.Logf("%s log:\n%s", name, l.String())
			}
			t.Logf("nats-server log:\n%s", strings.Join(e.log.since(0, ""), "\n"))
		}
	})
	e.ca = newCA(t, dir, "kuma")
	srvCert := e.ca.issue(t, "nats", x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	e.client = e.ca.issue(t, "kuma", x509.ExtKeyUsageClientAuth)
	// Values are read as config values: strings are quoted, as
	// kuma.env.example shows.
	q := strconv.Quote
	t.Setenv("KUMA_NATSD_SERVER_NAME", "kuma-test")
	t.Setenv("KUMA_NATSD_ROUTES", "[]")
	t.Setenv("KUMA_NATSD_STORE_DIR", q(filepath.Join(dir, "jetstream")))
	t.Setenv("KUMA_NATSD_TLS_CERT", q(srvCert.Cert))
	t.Setenv("KUMA_NATSD_TLS_KEY", q(srvCert.Key))
	t.Setenv("KUMA_NATSD_TLS_CA", q(e.ca.CertPEM))
	for _, u := range users {
		e.passwords[u] = "pw-" + u + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
		t.Setenv("KUMA_NATSD_"+strings.ToUpper(u)+"_PASSWORD", q(e.passwords[u]))
	}
	// The server may hold a bcrypt hash instead (nats server passwd); here
	// ops's, of a fixed test password, cost 4.
	e.passwords["ops"] = "ops-test-password"
	t.Setenv("KUMA_NATSD_OPS_PASSWORD", q("$2a$04$701b0xJzRlbMHlqgDH8jQuWo8moGhxxhNzvQYfQa6cREC95pFtDGm"))
	// A test-only superuser observes every subject: a refused publish must
	// reach no one, not even it.
	b, err := os.ReadFile("kuma.conf")
	if err != nil {
		t.Fatal(err)
	}
	const marker = "  users = [\n"
	if strings.Count(string(b), marker) != 1 {
		t.Fatalf("kuma.conf has no single %q line to add the test's observer after", marker)
	}
	e.passwords["observer"] = "pw-observer"
	conf := strings.Replace(string(b), marker, marker+
		`    { user: observer, password: "pw-observer", permissions: { publish: ">", subscribe: ">" } }`+"\n", 1)
	e.conf = filepath.Join(dir, "kuma.conf")
	if err := os.WriteFile(e.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	e.srv, e.log = e.startServer(t, nil)
	e.url = fmt.Sprintf("tls://127.0.0.1:%d", e.srv.Addr().(*net.TCPAddr).Port)
	return e
}

// startServer runs a server from the config file with a random client port
// and no monitoring port. It is standalone (no cluster port) unless mutate
// says otherwise: a clustered JetStream needs a second member for a quorum.
func (e *env) startServer(t *testing.T, mutate func(*server.Options)) (*server.Server, *serverLog) {
	t.Helper()
	opts, err := server.ProcessConfigFile(e.conf)
	if err != nil {
		t.Fatalf("kuma.conf: %v", err)
	}
	verify := func(c *tls.Config) bool { return c != nil && c.ClientAuth == tls.RequireAndVerifyClientCert }
	if !verify(opts.TLSConfig) || !verify(opts.Cluster.TLSConfig) || len(opts.Users) != len(users)+1 {
		t.Fatalf("kuma.conf: want client and route TLS that verify certificates, and %d users; got %v, %v, %d users",
			len(users), verify(opts.TLSConfig), verify(opts.Cluster.TLSConfig), len(opts.Users)-1)
	}
	opts.Port, opts.HTTPPort, opts.Cluster.Port = -1, 0, 0
	opts.NoSigs = true
	if mutate != nil {
		mutate(opts)
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	log := &serverLog{}
	srv.SetLoggerV2(log, false, false, false)
	go srv.Start()
	if !srv.ReadyForConnections(bound) {
		t.Fatalf("nats-server not ready:\n%s", strings.Join(log.since(0, ""), "\n"))
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv, log
}

// auth is the NATS part of a Kuma config for user.
func (e *env) auth(user string) app.Config {
	return app.Config{NATSUser: user, NATSPassword: e.passwords[user],
		NATSTLSCA: e.ca.CertPEM, NATSTLSCert: e.client.Cert, NATSTLSKey: e.client.Key}
}

// connect connects as user with the options Kuma itself builds, recording
// what the server refuses.
func (e *env) connect(t *testing.T, user string, extra ...nats.Option) (*nats.Conn, *errLog) {
	t.Helper()
	cfg := e.auth(user)
	opts, err := cfg.NATSOptions()
	if err != nil {
		t.Fatal(err)
	}
	el := &errLog{}
	opts = append(opts, nats.Name("test-"+user), nats.ErrorHandler(el.handle))
	nc, err := nats.Connect(e.url, append(opts, extra...)...)
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(nc.Close)
	return nc, el
}

// startKuma starts one service of Kuma as its own process would: its own
// user, the CA, the client certificate.
func (e *env) startKuma(t *testing.T, target string) *app.App {
	t.Helper()
	logs := &kumatest.LogBuffer{}
	e.logs[target] = logs
	cfg := e.auth(target)
	cfg.Target, cfg.NATSURL, cfg.NodeName = target, e.url, "node-"+target
	cfg.DataDir = filepath.Join(e.dir, target)
	cfg.Context, cfg.Shards = "default", 4
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	switch target {
	case "keyvault":
		cfg.MasterKey = []byte("0123456789abcdef0123456789abcdef")
	case "console":
		cfg.Console.Listen = "127.0.0.1:0"
	}
	a, err := app.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*bound)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatalf("start %s as user %s: %v\n%s", target, target, err, logs.String())
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		defer cancel()
		if err := a.Stop(ctx); err != nil {
			t.Errorf("stop %s: %v", target, err)
		}
	})
	return a
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// flush round-trips each connection in order: what the server routed before
// it answered the last PING has reached the client's subscriptions.
func flush(t *testing.T, conns ...*nats.Conn) {
	t.Helper()
	for _, nc := range conns {
		if err := nc.FlushTimeout(bound); err != nil {
			t.Fatal(err)
		}
	}
}

// drain returns how many messages a subscription holds, and empties it.
func drain(t *testing.T, s *nats.Subscription) int {
	t.Helper()
	n, _, err := s.Pending()
	if err != nil {
		return 0 // a refused subscription holds nothing
	}
	for range n {
		if _, err := s.NextMsg(bound); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

func waitUntil(cond func() bool) bool {
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// errLog records the asynchronous errors of one connection.
type errLog struct {
	mu   sync.Mutex
	errs []string
}

func (l *errLog) handle(_ *nats.Conn, _ *nats.Subscription, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errs = append(l.errs, strings.ToLower(err.Error()))
}

func (l *errLog) waitFor(substr string) bool {
	substr = strings.ToLower(substr)
	return waitUntil(func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, e := range l.errs {
			if strings.Contains(e, substr) {
				return true
			}
		}
		return false
	})
}

// serverLog is a nats-server logger that keeps its lines.
type serverLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *serverLog) add(level, format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, level+" "+fmt.Sprintf(format, v...))
}

func (l *serverLog) Noticef(format string, v ...any) { l.add("INF", format, v...) }
func (l *serverLog) Warnf(format string, v ...any)   { l.add("WRN", format, v...) }
func (l *serverLog) Fatalf(format string, v ...any)  { l.add("FTL", format, v...) }
func (l *serverLog) Errorf(format string, v ...any)  { l.add("ERR", format, v...) }
func (l *serverLog) Debugf(format string, v ...any)  { l.add("DBG", format, v...) }
func (l *serverLog) Tracef(format string, v ...any)  { l.add("TRC", format, v...) }

func (l *serverLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.lines)
}

// since returns the lines from index i on that contain every substring.
func (l *serverLog) since(i int, substrs ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
next:
	for _, line := range l.lines[i:] {
		for _, s := range substrs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		out = append(out, line)
	}
	return out
}

// waitFor waits for a line from index i on that contains every substring.
func (l *serverLog) waitFor(i int, substrs ...string) bool {
	return waitUntil(func() bool { return len(l.since(i, substrs...)) > 0 })
}
