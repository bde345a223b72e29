// Package natsconf_test runs deployments/nats/kuma.conf in a real
// nats-server and holds it to its promises: Kuma's services work with the
// least rights it gives them, every user is refused everything else, and no
// connection gets in without TLS, a client certificate and its password.
package natsconf_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// users are kuma.conf's users, in the order the matrix prints them.
var users = []string{"client", "console", "ops", "follower", "router", "shardnode", "projector", "keyvault"}

// responders answer requests, so they may publish to any _INBOX.
var responders = []string{"router", "shardnode", "projector", "keyvault"}

// bound limits every wait for something that must happen; it is reached
// only when the test is failing.
const bound = 15 * time.Second

// probe is one kind of subject and who may publish to it and subscribe to
// it; everyone else must be refused. Subjects in the context "probe" match
// the same permissions as the served context but reach no service.
type probe struct {
	kind     string
	subject  string // %s is the probing user
	pub, sub []string
}

var probes = []probe{
	{"public append", "kuma.probe.append.e1", []string{"client"}, []string{"router"}},
	{"public read", "kuma.probe.read.e1", []string{"client", "console"}, []string{"router"}},
	{"public forget", "kuma.probe.forget.e1", []string{"client"}, []string{"router"}},
	{"public query", "kuma.probe.query.entities", []string{"client", "console"}, []string{"projector"}},
	{"feed of any context", "kuma.probe.feed", []string{"client"}, []string{"router"}},
	{"feed of default", "kuma.default.feed", []string{"client", "follower"}, []string{"router"}},
	{"admin status", "kuma.probe.status", []string{"console", "ops"}, []string{"shardnode"}},
	{"admin shard migrate", "kuma.probe.shard.migrate", []string{"ops"}, []string{"shardnode"}},
	{"node status", "_kuma.probe.node.n1.status", []string{"shardnode"}, []string{"shardnode"}},
	{"admin projection rebuild", "kuma.probe.projection.rebuild.entities", []string{"ops"}, []string{"projector"}},
	{"admin projection drop", "kuma.probe.projection.drop.gone", []string{"ops"}, []string{"projector"}},
	{"stream events", "kuma.probe.events.0", []string{"shardnode"}, nil},
	{"stream forget notice", "kuma.probe.events.0.forgotten", []string{"shardnode"}, nil},
	{"internal shard", "_kuma.probe.shard.0.append.e1", []string{"router"}, []string{"shardnode"}},
	{"admin shard backup", "_kuma.probe.shard.0.backup", []string{"ops"}, []string{"shardnode"}},
	{"keyvault backup", "_kuma.keyvault.backup", []string{"ops"}, []string{"keyvault"}},
	{"keyvault tombstones", "_kuma.keyvault.tombstones", []string{"ops"}, []string{"keyvault"}},
	{"$O backup chunk", "$O.KUMA_BACKUPS.C.probe", []string{"shardnode", "keyvault"}, nil},
	{"$JS backup chunk erase", "$JS.API.STREAM.MSG.DELETE.OBJ_KUMA_BACKUPS", []string{"ops"}, nil},
	{"keyvault key", "_kuma.keyvault.key", []string{"shardnode", "projector"}, []string{"keyvault"}},
	{"keyvault shred", "_kuma.keyvault.shred", []string{"shardnode"}, []string{"keyvault"}},
	{"keyvault forgotten", "_kuma.keyvault.forgotten", []string{"shardnode", "projector"}, []string{"keyvault"}},
	{"keyvault pseudonyms", "_kuma.keyvault.pseudonyms", []string{"shardnode"}, []string{"keyvault"}},
	{"keyvault shredded", "_kuma.keyvault.shredded", []string{"keyvault"}, []string{"shardnode", "projector"}},
	{"projector status", "_kuma.probe.projector.status", []string{"shardnode"}, []string{"projector"}},
	{"projector replicas", "_kuma.probe.projector.replicas.rebuild", []string{"projector"}, []string{"projector"}},
	{"$JS stream create", "$JS.API.STREAM.CREATE.KUMA_default", []string{"shardnode"}, nil},
	{"$JS stream delete", "$JS.API.STREAM.DELETE.KUMA_default", nil, nil},
	{"$JS stream purge", "$JS.API.STREAM.PURGE.KUMA_default", nil, nil},
	{"$JS stream info", "$JS.API.STREAM.INFO.KUMA_default", []string{"ops", "shardnode", "projector"}, nil},
	{"$JS msg get", "$JS.API.STREAM.MSG.GET.KUMA_default", []string{"shardnode"}, nil},
	{"$JS consumer create", "$JS.API.CONSUMER.CREATE.KUMA_default.probe", []string{"projector"}, nil},
	{"$JS consumer list", "$JS.API.CONSUMER.LIST.KUMA_default", []string{"ops", "projector"}, nil},
	{"$JS consumer delete", "$JS.API.CONSUMER.DELETE.KUMA_default.probe", []string{"projector"}, nil},
	{"$JS consumer next", "$JS.API.CONSUMER.MSG.NEXT.KUMA_default.probe", []string{"projector"}, nil},
	{"$JS ack", "$JS.ACK.KUMA_default.probe.1.1.1.1.0", []string{"projector"}, nil},
	{"$JS other stream", "$JS.API.STREAM.CREATE.OTHER", nil, nil},
	{"$KV leases", "$KV.KUMA_LEASES.probe", []string{"shardnode"}, nil},
	{"$JS KV bucket", "$JS.API.STREAM.CREATE.KV_KUMA_LEASES", []string{"shardnode"}, nil},
	{"$O snapshots", "$O.KUMA_SNAPSHOTS.M.probe", []string{"shardnode"}, nil},
	{"$JS snapshot chunk erase", "$JS.API.STREAM.MSG.DELETE.OBJ_KUMA_SNAPSHOTS", []string{"shardnode"}, nil},
	{"$JS snapshot chunk find", "$JS.API.DIRECT.GET.OBJ_KUMA_SNAPSHOTS", []string{"shardnode"}, nil},
	{"$JS event delete", "$JS.API.STREAM.MSG.DELETE.KUMA_default", nil, nil},
	{"$KV keyvault keys", "$KV.KUMA_KEYS.k.probe.x", []string{"keyvault"}, nil},
	{"$JS keys bucket create", "$JS.API.STREAM.CREATE.KV_KUMA_KEYS", []string{"keyvault"}, nil},
	{"$JS keys bucket info", "$JS.API.STREAM.INFO.KV_KUMA_KEYS", []string{"ops", "keyvault", "shardnode"}, nil},
	{"$JS keys bucket raise", "$JS.API.STREAM.UPDATE.KV_KUMA_KEYS", []string{"shardnode"}, nil},
	{"$JS key read", "$JS.API.STREAM.MSG.GET.KV_KUMA_KEYS", []string{"keyvault"}, nil},
	{"$JS key erase", "$JS.API.STREAM.MSG.DELETE.KV_KUMA_KEYS", []string{"keyvault"}, nil},
	{"$JS keys purge", "$JS.API.STREAM.PURGE.KV_KUMA_KEYS", nil, nil},
	{"$JS keys direct get", "$JS.API.DIRECT.GET.KV_KUMA_KEYS", nil, nil},
	{"$SRV all", "$SRV.PING", []string{"ops"}, []string{"router", "shardnode", "projector", "keyvault"}},
	{"$SRV keyvault", "$SRV.INFO.kuma-keyvault", []string{"ops"}, []string{"keyvault"}},
	{"$SYS server", "$SYS.REQ.SERVER.PING", nil, nil},
	{"own inbox", "_INBOX.%s.probe", responders, users},
	{"shardnode inbox", "_INBOX.shardnode.probe", responders, []string{"shardnode"}},
	{"plain inbox", "_INBOX.probe", responders, nil},
}

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

// matrix checks every user against every probe, both ways, before any Kuma
// service runs (so no probe can disturb one). It returns the cells checked
// and how many of them were denied.
func (e *env) matrix(t *testing.T) (total, denied int) {
	obs, _ := e.connect(t, "observer", nats.NoEcho())
	watch := map[string]*nats.Subscription{}
	watching := func(subject string) *nats.Subscription {
		if s, ok := watch[subject]; ok {
			return s
		}
		s, err := obs.SubscribeSync(subject)
		if err != nil {
			t.Fatal(err)
		}
		if err := obs.Flush(); err != nil {
			t.Fatal(err)
		}
		watch[subject] = s
		return s
	}
	table := map[string]map[string]string{}
	for _, user := range users {
		nc, el := e.connect(t, user)
		for _, p := range probes {
			subject := p.subject
			if strings.Contains(subject, "%s") {
				subject = fmt.Sprintf(subject, user)
			}
			cell := ""
			// Publish: the observer must see it if allowed, and nothing
			// (with the violation reported to the publisher) if not.
			// verdict checks one direction: got messages crossed it.
			verdict := func(op string, allowed bool, got int) {
				switch {
				case allowed && got != 1:
					t.Errorf("%s %s %s (%s): %d messages crossed, want 1 (allowed)", user, op, subject, p.kind, got)
				case !allowed && got != 0:
					t.Errorf("%s %s %s (%s): %d messages crossed, want 0 (must be denied)", user, op, subject, p.kind, got)
				case !allowed && !el.waitFor(`permissions violation for `+op+` to "`+subject+`"`):
					t.Errorf("%s %s %s (%s): no permissions violation reported", user, op, subject, p.kind)
				}
				if !allowed {
					denied++
				}
				total++
			}
			ws := watching(subject)
			mustPub := contains(p.pub, user)
			if err := nc.Publish(subject, []byte("probe")); err != nil {
				t.Fatal(err)
			}
			flush(t, nc, obs)
			verdict("publish", mustPub, drain(t, ws))
			cell += cellMark(mustPub, "P")
			// Subscribe: an allowed subscriber gets the observer's message,
			// a refused one gets nothing and is told.
			mustSub := contains(p.sub, user)
			s, err := nc.SubscribeSync(subject)
			if err != nil {
				t.Fatal(err)
			}
			flush(t, nc)
			if err := obs.Publish(subject, []byte("probe")); err != nil {
				t.Fatal(err)
			}
			flush(t, obs, nc)
			verdict("subscription", mustSub, drain(t, s))
			_ = s.Unsubscribe()
			cell += cellMark(mustSub, "S")
			if table[p.kind] == nil {
				table[p.kind] = map[string]string{}
			}
			table[p.kind][user] = cell
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "permission matrix (P publish, S subscribe allowed; - denied):\n%-26s", "subject kind")
	for _, u := range users {
		fmt.Fprintf(&b, " %-10s", u)
	}
	for _, p := range probes {
		fmt.Fprintf(&b, "\n%-26s", p.kind)
		for _, u := range users {
			fmt.Fprintf(&b, " %-10s", table[p.kind][u])
		}
	}
	t.Log(b.String())
	return total, denied
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

// happyPath uses Kuma as an application (user client), an operator (ops)
// and the console would, over TLS.
func (e *env) happyPath(t *testing.T, console *app.App) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*bound)
	defer cancel()
	nc, _ := e.connect(t, "client")
	c, err := client.New(nc, client.Options{Context: "default", Timeout: bound})
	if err != nil {
		t.Fatal(err)
	}
	ap, err := c.Append(ctx, "user_1", []kuma.EventInput{{Type: "UserCreated",
		Data: json.RawMessage(`{"name":"Dwighson","role":"architect"}`)}}, client.ExpectVersion(0))
	if err != nil {
		t.Fatalf("append as client: %v", err)
	}
	rd, err := c.Read(ctx, "user_1")
	if err != nil || rd.Version != 1 || !strings.Contains(string(rd.State), "Dwighson") {
		t.Fatalf("read as client: %+v, %v", rd, err)
	}
	h, err := c.History(ctx, "user_1", 1, 10)
	if err != nil || len(h.Events) != 1 || h.Events[0].Type != "UserCreated" {
		t.Fatalf("history as client: %+v, %v", h, err)
	}
	q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: ap.Position,
		Params: map[string]json.RawMessage{"where": json.RawMessage(`{"role":"architect"}`)}})
	if err != nil || len(q.Rows) != 1 || q.Rows[0]["entity"] != "user_1" {
		t.Fatalf("query as client (read your write through the projector): %+v, %v", q, err)
	}
	if ex, err := c.Export(ctx, "user_1"); err != nil || len(ex.Events) != 1 {
		t.Fatalf("export as client: %+v, %v", ex, err)
	}
	// A follower reads the feed of its context, opened by the shardnodes,
	// with no right to the keyvault or the stream: a page, and a
	// subscription (the Go client's Subscribe is built on the feed).
	fnc, _ := e.connect(t, "follower")
	fc, err := client.New(fnc, client.Options{Context: "default", Timeout: bound})
	if err != nil {
		t.Fatal(err)
	}
	page, err := fc.Feed(ctx, kuma.FeedRequest{Prefix: "user_1"})
	if err != nil || len(page.Events) != 1 || page.Events[0].Type != "UserCreated" || !strings.Contains(string(page.Events[0].Data), "Dwighson") {
		t.Fatalf("feed as follower: %+v, %v", page, err)
	}
	got := make(chan client.Event, 1)
	sub, err := fc.Subscribe(ctx, client.SubscribeOptions{Entity: "user_1"}, func(ev client.Event) error {
		got <- ev
		return nil
	})
	if err != nil {
		t.Fatalf("subscribe as follower: %v", err)
	}
	select {
	case ev := <-got:
		if ev.Type != "UserCreated" || !strings.Contains(string(ev.Data), "Dwighson") {
			t.Fatalf("follower's subscription got %+v, want the opened UserCreated", ev)
		}
	case <-sub.Done():
		t.Fatalf("the follower's subscription ended: %v", sub.Err())
	case <-ctx.Done():
		t.Fatal("the follower's subscription got no event")
	}
	sub.Stop()
	// forget runs the keyvault's shred, its broadcast and the stream's notice.
	if _, err := c.Append(ctx, "user_2", []kuma.EventInput{{Type: "UserCreated", Data: json.RawMessage(`{"name":"Erased"}`)}}); err != nil {
		t.Fatal(err)
	}
	if fr, err := c.Forget(ctx, "user_2", "test", "natsconf test"); err != nil || fr.EventsDeleted != 1 {
		t.Fatalf("forget as client: %+v, %v", fr, err)
	}
	if _, err := c.Read(ctx, "user_2"); !errors.Is(err, kuma.ErrEntityForgotten) {
		t.Fatalf("read after forget: %v, want entity_forgotten", err)
	}
	// ops reads the status: every shard, and the projector's answer
	// through the shardnode.
	onc, _ := e.connect(t, "ops")
	oc, err := client.New(onc, client.Options{Context: "default", Timeout: bound})
	if err != nil {
		t.Fatal(err)
	}
	st, err := oc.Status(ctx)
	if err != nil || len(st.Shards) != 4 || len(st.Projections) == 0 {
		t.Fatalf("status as ops: %+v, %v", st, err)
	}
	// ops backs up (what kuma backup does): a shard's copy and the
	// keyvault's (exported from its bucket), each downloaded and erased,
	// and the keyvault's tombstones.
	ojs, err := jetstream.New(onc)
	if err != nil {
		t.Fatal(err)
	}
	for i, ask := range []func() (*kuma.BackupReply, error){
		func() (*kuma.BackupReply, error) { return oc.BackupShard(ctx, 0, "natsconf") },
		func() (*kuma.BackupReply, error) { return oc.BackupKeyvault(ctx, "natsconf") },
	} {
		rep, err := ask()
		if err != nil {
			t.Fatalf("backup %d as ops: %v", i, err)
		}
		if err := cluster.GetBackup(ctx, ojs, rep.Object, filepath.Join(t.TempDir(), "copy.db")); err != nil {
			t.Fatalf("download of backup %s as ops: %v", rep.Object, err)
		}
	}
	// What a backup cut short runs: list and erase what is left (nothing).
	if n, err := cluster.EraseBackups(ctx, ojs, "natsconf/"); err != nil || n != 0 {
		t.Fatalf("erase a backup's leftovers as ops: %d, %v", n, err)
	}
	if tb, err := oc.Tombstones(ctx, "", 10); err != nil || len(tb.Tombstones) != 1 {
		t.Fatalf("tombstones as ops: %+v, %v, want user_2's", tb, err)
	}
	// The console (user console) serves an entity.
	res, err := http.Get(console.Console().URL() + "api/entities/user_1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !strings.Contains(string(body), "Dwighson") {
		t.Fatalf("console entity page: %d %s", res.StatusCode, body)
	}
}

// replyInjection sends requests whose reply subject lies in a namespace no
// answer may go to: the event stream, the stream's purge API, a KV bucket,
// the shard subjects; to entity and status endpoints and to the $SRV
// discovery subjects every service answers. NATS checks
// no permission on a reply subject a requester names, and the shardnode's
// own rights include the stream, so the services themselves must drop such
// requests (kuma.ReplyAllowed); kuma.conf adds a second wall by giving
// responders _INBOX.> only (no allow_responses). No answer may arrive and
// the stream must not change; a proper request to the same endpoint right
// after is answered, so the service did handle the bad one first.
func (e *env) replyInjection(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	obs, _ := e.connect(t, "observer", nats.NoEcho())
	js, err := jetstream.New(obs)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, kuma.StreamName("default"))
	if err != nil {
		t.Fatal(err)
	}
	before := stream.CachedInfo().State
	client, _ := e.connect(t, "client")
	ops, _ := e.connect(t, "ops") // status is for operators
	for _, tc := range []struct {
		nc             *nats.Conn
		request, reply string
	}{
		{client, "kuma.default.query.entities", "kuma.default.events.0"},
		{client, "kuma.default.read.user_1", "kuma.default.events.0"},
		{client, "kuma.default.read.user_1", "$JS.API.STREAM.PURGE.KUMA_default"},
		{ops, "kuma.default.status", "kuma.default.events.0"},
		{ops, "kuma.default.status", "$JS.API.STREAM.PURGE.KUMA_default"},
		// Service discovery (nats micro ping|info|stats), which ops may
		// use, under each service's own rights: the shardnode's include
		// the stream and the KV buckets, the router's the shard subjects.
		{ops, "$SRV.PING.kuma-shardnode", "kuma.default.events.0"},
		{ops, "$SRV.INFO.kuma-shardnode", "kuma.default.events.0.forgotten"},
		{ops, "$SRV.STATS.kuma-shardnode", "$KV.KUMA_LEASES.probe"},
		{ops, "$SRV.PING.kuma-router", "_kuma.default.shard.0.read.probe"},
		{ops, "$SRV.INFO.kuma-projector", "$JS.API.STREAM.PURGE.KUMA_default"},
		{ops, "$SRV.STATS.kuma-keyvault", "_kuma.keyvault.shredded"},
	} {
		nc := tc.nc
		ws, err := obs.SubscribeSync(tc.reply)
		if err != nil {
			t.Fatal(err)
		}
		flush(t, obs)
		if err := nc.PublishMsg(&nats.Msg{Subject: tc.request, Reply: tc.reply, Data: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
		if _, err := nc.Request(tc.request, []byte(`{}`), bound); err != nil {
			t.Fatalf("%s with a proper inbox: %v", tc.request, err)
		}
		flush(t, obs)
		if n := drain(t, ws); n != 0 {
			t.Errorf("%d answers to %s reached %s", n, tc.request, tc.reply)
		}
		_ = ws.Unsubscribe()
	}
	ctx, cancel = context.WithTimeout(context.Background(), bound)
	defer cancel()
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after := info.State; after.Msgs != before.Msgs || after.LastSeq != before.LastSeq {
		t.Errorf("the event stream changed: %d messages up to %d, then %d up to %d",
			before.Msgs, before.LastSeq, after.Msgs, after.LastSeq)
	}
}

// refused checks that a connection needs TLS, a client certificate from
// the CA and the user's own password.
func (e *env) refused(t *testing.T) {
	port := e.srv.Addr().(*net.TCPAddr).Port
	t.Run("plaintext", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), bound)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(bound))
		r := bufio.NewReader(conn)
		info, err := r.ReadString('\n')
		if err != nil || !strings.Contains(info, `"tls_required":true`) {
			t.Fatalf("INFO %q, %v: want tls_required", info, err)
		}
		fmt.Fprintf(conn, "CONNECT {\"user\":\"client\",\"pass\":%q,\"verbose\":false}\r\nPING\r\n", e.passwords["client"])
		rest, _ := io.ReadAll(r)
		if strings.Contains(string(rest), "PONG") {
			t.Fatalf("a plaintext connection was served: %q", rest)
		}
	})
	tlsDial := func(user, password string, cert *leaf, rootCA string) error {
		cfg := app.Config{NATSUser: user, NATSPassword: password, NATSTLSCA: rootCA}
		if cert != nil {
			cfg.NATSTLSCert, cfg.NATSTLSKey = cert.Cert, cert.Key
		}
		opts, err := cfg.NATSOptions()
		if err != nil {
			return err
		}
		nc, err := nats.Connect(e.url, append(opts, nats.Timeout(bound), nats.NoReconnect())...)
		if err == nil {
			nc.Close()
		}
		return err
	}
	other := newCA(t, e.dir, "other")
	otherCert := other.issue(t, "intruder", x509.ExtKeyUsageClientAuth)
	for _, tc := range []struct {
		name, user, password string
		cert                 *leaf
		want                 string // in the error; "" is a success
	}{
		{"control: right password and certificate", "client", e.passwords["client"], &e.client, ""},
		{"wrong password", "client", "guess", &e.client, "authorization violation"},
		{"another user's password", "client", e.passwords["shardnode"], &e.client, "authorization violation"},
		{"unknown user", "admin", e.passwords["client"], &e.client, "authorization violation"},
		{"no client certificate", "client", e.passwords["client"], nil, ""},
		{"client certificate of another CA", "client", e.passwords["client"], &otherCert, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tlsDial(tc.user, tc.password, tc.cert, e.ca.CertPEM)
			switch {
			case strings.HasPrefix(tc.name, "control"):
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
			case err == nil:
				t.Fatal("connected")
			case tc.want != "" && !strings.Contains(strings.ToLower(err.Error()), tc.want):
				t.Fatalf("refused with %v, want %q", err, tc.want)
			}
		})
	}
	t.Run("server not signed by the trusted CA", func(t *testing.T) {
		if err := tlsDial("client", e.passwords["client"], &e.client, other.CertPEM); err == nil {
			t.Fatal("connected to a server the client's CA did not sign")
		}
	})
}

// routes joins a second server to a first over the cluster TLS of
// kuma.conf, and checks that a third, with a certificate of another CA,
// does not get in. JetStream is off: these servers test routes only.
func (e *env) routes(t *testing.T) {
	noJS := func(o *server.Options) {
		o.JetStream = false
		o.Cluster.Host, o.Cluster.Port = "127.0.0.1", -1
	}
	a, alog := e.startServer(t, func(o *server.Options) { noJS(o); o.ServerName = "route-a" })
	// peers names the servers a routes to (a pool of routes each).
	peers := func() map[string]bool {
		rz, err := a.Routez(nil)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, r := range rz.Routes {
			out[r.RemoteName] = true
		}
		return out
	}
	seed := server.RoutesFromStr(fmt.Sprintf("nats-route://127.0.0.1:%d", a.ClusterAddr().Port))
	e.startServer(t, func(o *server.Options) { noJS(o); o.ServerName = "route-b"; o.Routes = seed })
	if !waitUntil(func() bool { return peers()["route-b"] }) {
		t.Fatalf("no TLS route from a server with the CA's certificate:\n%s", strings.Join(alog.since(0, "rror"), "\n"))
	}
	other := newCA(t, e.dir, "rogue")
	rogue := other.issue(t, "nats", x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	rogueTLS, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: rogue.Cert, KeyFile: rogue.Key, CaFile: e.ca.CertPEM, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	mark := alog.len()
	e.startServer(t, func(o *server.Options) {
		noJS(o)
		o.ServerName = "route-rogue"
		o.Routes = seed
		o.Cluster.TLSConfig = rogueTLS
	})
	if !alog.waitFor(mark, "TLS route handshake error") {
		t.Fatalf("no refused route handshake in the seed's log:\n%s", strings.Join(alog.since(mark, ""), "\n"))
	}
	if p := peers(); p["route-rogue"] || len(p) != 1 {
		t.Fatalf("the seed routes to %v after a server with another CA's certificate tried to join; want route-b only", p)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func cellMark(allowed bool, letter string) string {
	if allowed {
		return letter
	}
	return "-"
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
