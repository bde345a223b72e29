package natsconf_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

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
