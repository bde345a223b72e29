package natsbus_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kumadb/kuma/pkg/natsbus"
)

// startMember starts one embedded server on 127.0.0.1 with random ports
// and stops it when the test ends.
func startMember(t *testing.T, cfg natsbus.ServerConfig) *server.Server {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:-1"
	}
	if cfg.StoreDir == "" {
		cfg.StoreDir = t.TempDir()
	}
	srv, err := natsbus.StartServer(t.Context(), cfg)
	if err != nil {
		t.Fatalf("start %s: %v", cfg.ServerName, err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return srv
}

func connect(t *testing.T, srv *server.Server) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatalf("connect %s: %v", srv.Name(), err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// eventually polls cond until it holds or ctx ends, then fails with what.
func eventually(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v", what, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// routedPeers is the set of servers srv has a route to (the route pool
// opens several connections per peer).
func routedPeers(t *testing.T, srv *server.Server) map[string]bool {
	t.Helper()
	rz, err := srv.Routez(nil)
	if err != nil {
		t.Fatalf("routez %s: %v", srv.Name(), err)
	}
	peers := map[string]bool{}
	for _, r := range rz.Routes {
		peers[r.RemoteName] = true
	}
	return peers
}

func metaGroup(t *testing.T, srv *server.Server) server.MetaClusterInfo {
	t.Helper()
	jsz, err := srv.Jsz(nil)
	if err != nil || jsz.Meta == nil {
		t.Fatalf("jsz %s: got %+v, %v, want meta group info", srv.Name(), jsz, err)
	}
	return *jsz.Meta
}

func metaLeader(servers ...*server.Server) *server.Server {
	for _, s := range servers {
		if s.Running() && s.JetStreamIsLeader() {
			return s
		}
	}
	return nil
}

// TestClusterOfThree: a first member started alone with a cluster listener
// has no JetStream until a second joins; two more join it by its route URL
// and find each other; a three-replica stream written through one member
// is read through another, and stays writable with its leader gone.
func TestClusterOfThree(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	began := time.Now()

	s1 := startMember(t, natsbus.ServerConfig{ServerName: "k1", ClusterListen: "127.0.0.1:-1"})
	nc1 := connect(t, s1)

	// Alone, the first member's meta group expects two members and needs
	// both for a quorum, so its JetStream cannot answer yet.
	if m := metaGroup(t, s1); m.Size != 2 || m.QuorumNeeded != 2 || m.Leader != "" {
		t.Fatalf("meta group of a lone first member: got size %d, quorum %d, leader %q; want 2, 2, none", m.Size, m.QuorumNeeded, m.Leader)
	}
	short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
	err := natsbus.WaitJetStream(short, nc1)
	cancelShort()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitJetStream on a lone first member: got %v, want deadline exceeded", err)
	}

	route := "nats://" + s1.ClusterAddr().String()
	s2 := startMember(t, natsbus.ServerConfig{ServerName: "k2", ClusterListen: "127.0.0.1:-1", Routes: []string{route}})
	s3 := startMember(t, natsbus.ServerConfig{ServerName: "k3", ClusterListen: "127.0.0.1:-1", Routes: []string{route}})
	servers := []*server.Server{s1, s2, s3}
	names := map[string]*server.Server{"k1": s1, "k2": s2, "k3": s3}

	// k2 and k3 know only k1: gossip must give them each other.
	for _, s := range servers {
		eventually(ctx, t, s.Name()+" routes to both others", func() bool { return len(routedPeers(t, s)) == 2 })
	}
	routed := time.Since(began)
	if err := natsbus.WaitJetStream(ctx, nc1); err != nil {
		t.Fatalf("WaitJetStream: %v", err)
	}
	if metaLeader(servers...) == nil {
		t.Fatal("JetStream answers but no server is meta leader")
	}
	t.Logf("from first start: routes in %v, meta leader in %v", routed, time.Since(began))
	eventually(ctx, t, "meta group growing to 3", func() bool {
		l := metaLeader(servers...)
		return l != nil && metaGroup(t, l).Size == 3
	})

	nc2, nc3 := connect(t, s2), connect(t, s3)
	// The answers of the other members come once their interest has
	// crossed the routes, so ask until all three count.
	var peers int
	eventually(ctx, t, "JetStreamPeers reaching 3", func() bool {
		peers, err = natsbus.JetStreamPeers(ctx, nc2)
		return err == nil && peers == 3
	})
	if got := natsbus.Replicas(peers); got != 3 {
		t.Fatalf("Replicas(%d) = %d, want 3", peers, got)
	}
	t.Logf("from first start: 3 JetStream peers in %v", time.Since(began))

	// The new members enter the meta group through its leader; a stream
	// with three replicas can be placed once they have.
	js1, _ := jetstream.New(nc1)
	var stream jetstream.Stream
	eventually(ctx, t, "creating an R3 stream", func() bool {
		attempt, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		stream, err = js1.CreateStream(attempt, jetstream.StreamConfig{
			Name: "R3", Subjects: []string{"r3.>"}, Storage: jetstream.FileStorage, Replicas: 3,
		})
		return err == nil
	})
	if _, err := js1.Publish(ctx, "r3.a", []byte("one"), jetstream.WithMsgID("one")); err != nil {
		t.Fatalf("publish through k1: %v", err)
	}
	js2, _ := jetstream.New(nc2)
	s2stream, err := js2.Stream(ctx, "R3")
	if err != nil {
		t.Fatalf("stream through k2: %v", err)
	}
	msg, err := s2stream.GetMsg(ctx, 1)
	if err != nil || string(msg.Data) != "one" {
		t.Fatalf("read through k2: got %v, %v, want \"one\"", msg, err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("R3 stream cluster: got %+v, want a leader and 2 replicas", info.Cluster)
	}

	// Lose the stream's leader: the two left elect one and take writes.
	gone := names[info.Cluster.Leader]
	gone.Shutdown()
	gone.WaitForShutdown()
	var alive *nats.Conn
	for _, c := range []struct {
		s  *server.Server
		nc *nats.Conn
	}{{s1, nc1}, {s2, nc2}, {s3, nc3}} {
		if c.s != gone {
			alive = c.nc
		}
	}
	jsAlive, _ := jetstream.New(alive)
	var ack *jetstream.PubAck
	eventually(ctx, t, "publishing with "+gone.Name()+" down", func() bool {
		attempt, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		// The message id makes a retry of a write that landed a no-op.
		ack, err = jsAlive.Publish(attempt, "r3.a", []byte("two"), jetstream.WithMsgID("two"))
		return err == nil
	})
	if ack.Sequence != 2 {
		t.Fatalf("ack with %s down: got seq %d, want 2", gone.Name(), ack.Sequence)
	}
	sAlive, err := jsAlive.Stream(ctx, "R3")
	if err != nil {
		t.Fatal(err)
	}
	if msg, err := sAlive.GetMsg(ctx, 2); err != nil || string(msg.Data) != "two" {
		t.Fatalf("read with %s down: got %v, %v, want \"two\"", gone.Name(), msg, err)
	}
	if peers, err := natsbus.JetStreamPeers(ctx, alive); err != nil || peers != 2 {
		t.Fatalf("JetStreamPeers with %s down: got %d, %v, want 2", gone.Name(), peers, err)
	}
	t.Logf("stream leader %s lost; writable again %v after first start", gone.Name(), time.Since(began))
}

// TestStandaloneServer: without cluster settings the server is one
// JetStream peer, answers at once and holds one-replica streams only.
func TestStandaloneServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	srv := startMember(t, natsbus.ServerConfig{})
	nc := connect(t, srv)
	if err := natsbus.WaitJetStream(ctx, nc); err != nil {
		t.Fatalf("WaitJetStream: %v", err)
	}
	peers, err := natsbus.JetStreamPeers(ctx, nc)
	if err != nil || peers != 1 {
		t.Fatalf("JetStreamPeers: got %d, %v, want 1", peers, err)
	}
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "R1", Subjects: []string{"r1"}, Replicas: natsbus.Replicas(peers)}); err != nil {
		t.Fatalf("R1 stream: %v", err)
	}
	if _, err := js.Publish(ctx, "r1", []byte("x")); err != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "R3", Subjects: []string{"r3"}, Replicas: 3}); err == nil {
		t.Fatal("R3 stream on a standalone server: got nil error")
	}
}

func TestReplicas(t *testing.T) {
	for _, tc := range []struct{ peers, want int }{{0, 1}, {1, 1}, {2, 1}, {3, 3}, {4, 3}, {7, 3}} {
		if got := natsbus.Replicas(tc.peers); got != tc.want {
			t.Errorf("Replicas(%d) = %d, want %d", tc.peers, got, tc.want)
		}
	}
}

// TestStandaloneStoreCarriedIntoCluster: a standalone store's streams
// would be deleted as orphans by a clustered server, so a clustered start
// over it exports them first, and RestoreExport puts them back once the
// cluster's JetStream answers, with their sequences, messages, KV
// revisions and consumers. Joining an existing cluster with it is refused;
// a store that was clustered before starts clustered again as it is.
func TestStandaloneStoreCarriedIntoCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	store := t.TempDir()
	srv, err := natsbus.StartServer(ctx, natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: store})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	keep, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		if _, err := js.Publish(ctx, fmt.Sprintf("keep.%d", i), []byte(fmt.Sprintf("m%d", i)), jetstream.WithMsgID(fmt.Sprintf("id-%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	// A hole in the sequence, as a shredded message leaves.
	if err := keep.SecureDeleteMsg(ctx, 3); err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "LEASES"})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a", "b", "a"} {
		if _, err := kv.Put(ctx, k, []byte("v-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, "KEEP", jetstream.ConsumerConfig{Durable: "proj", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(2)
	if err != nil {
		t.Fatal(err)
	}
	for m := range batch.Messages() {
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
	}
	nc.Close()
	srv.Shutdown()
	srv.WaitForShutdown()

	_, err = natsbus.StartServer(ctx, natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: store, ServerName: "a", ClusterListen: "127.0.0.1:-1",
		Routes: []string{"nats://127.0.0.1:1"}})
	if err == nil || !strings.Contains(err.Error(), "standalone") || !strings.Contains(err.Error(), "no --join") {
		t.Fatalf("joining a cluster with a standalone store: got %v, want a refusal that says to start it with no --join", err)
	}
	if natsbus.PendingExport(store) {
		t.Fatal("a refused join exported the store")
	}

	first := startMember(t, natsbus.ServerConfig{ServerName: "a", StoreDir: store, ClusterListen: "127.0.0.1:-1"})
	if !natsbus.PendingExport(store) {
		t.Fatal("a clustered start over a standalone store left no export")
	}
	if _, err := os.Stat(filepath.Join(store, "jetstream.standalone", "$G", "streams", "KEEP")); err != nil {
		t.Fatalf("the old store is not kept aside: %v", err)
	}
	ncA := connect(t, first)
	stop, err := natsbus.ServeConversion(ncA, "a")
	if err != nil {
		t.Fatal(err)
	}
	second := startMember(t, natsbus.ServerConfig{ServerName: "b", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://" + first.ClusterAddr().String()}})
	ncB := connect(t, second)
	if err := natsbus.WaitJetStream(ctx, ncA); err != nil {
		t.Fatal(err)
	}
	// The joining member waits while the first converts...
	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	err = natsbus.WaitConversions(wctx, ncB, log)
	wcancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitConversions during a conversion: got %v, want it to wait until its deadline", err)
	}
	names, err := natsbus.RestoreExport(ctx, ncA, store, log)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if want := []string{"KEEP", "KV_LEASES"}; !slices.Equal(names, want) {
		t.Errorf("restored %v, want %v", names, want)
	}
	stop()
	// ...and goes on once it is done.
	if err := natsbus.WaitConversions(ctx, ncB, log); err != nil {
		t.Fatalf("WaitConversions after the conversion: %v", err)
	}
	if natsbus.PendingExport(store) {
		t.Error("the export is still pending after the restore")
	}

	jsB, _ := jetstream.New(ncB) // read through the other member: it is the cluster's
	st, err := jsB.Stream(ctx, "KEEP")
	if err != nil {
		t.Fatal(err)
	}
	if got := st.CachedInfo().State; got.Msgs != 4 || got.FirstSeq != 1 || got.LastSeq != 5 {
		t.Errorf("KEEP state: got %d msgs, seq %d..%d; want 4, 1..5", got.Msgs, got.FirstSeq, got.LastSeq)
	}
	for _, seq := range []uint64{1, 2, 4, 5} {
		m, err := st.GetMsg(ctx, seq)
		if err != nil || string(m.Data) != fmt.Sprintf("m%d", seq) {
			t.Errorf("KEEP seq %d: got %v (%v), want m%d", seq, m, err, seq)
		}
	}
	if _, err := st.GetMsg(ctx, 3); err == nil {
		t.Error("KEEP seq 3 was deleted standalone and is back")
	}
	// The message ids' duplicate window does not come along (nats-server
	// rebuilds it for a restored stream in a cluster from nothing): Kuma's
	// relays publish with a per-subject compare-and-set, which does.
	kvB, err := jsB.KeyValue(ctx, "LEASES")
	if err != nil {
		t.Fatal(err)
	}
	if e, err := kvB.Get(ctx, "a"); err != nil || string(e.Value()) != "v-a" || e.Revision() != 3 {
		t.Errorf("LEASES a: got %v, %v; want v-a at revision 3", e, err)
	}
	ci, err := st.Consumer(ctx, "proj")
	if err != nil {
		t.Fatalf("the durable consumer did not come along: %v", err)
	}
	if got := ci.CachedInfo().AckFloor.Stream; got != 2 {
		t.Errorf("consumer proj: ack floor %d, want 2", got)
	}

	// A crash after the restore but before the export was removed runs it
	// again: what the cluster holds with the same state counts as restored.
	if err := os.MkdirAll(filepath.Join(store, "standalone-export"), 0o700); err != nil {
		t.Fatal(err)
	}
	meta, _ := json.Marshal(server.JSApiStreamRestoreRequest{
		Config: server.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}, Storage: server.FileStorage},
		State:  server.StreamState{Msgs: 4, LastSeq: 5}})
	if err := os.WriteFile(filepath.Join(store, "standalone-export", "KEEP.json"), meta, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := natsbus.RestoreExport(ctx, ncA, store, log); err != nil {
		t.Fatalf("restore again: %v", err)
	}
	// One the cluster holds with another state is not this node's: refused.
	if err := os.MkdirAll(filepath.Join(store, "standalone-export"), 0o700); err != nil {
		t.Fatal(err)
	}
	meta, _ = json.Marshal(server.JSApiStreamRestoreRequest{
		Config: server.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}, Storage: server.FileStorage},
		State:  server.StreamState{Msgs: 40, LastSeq: 50}})
	if err := os.WriteFile(filepath.Join(store, "standalone-export", "KEEP.json"), meta, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := natsbus.RestoreExport(ctx, ncA, store, log); err == nil || !strings.Contains(err.Error(), "already holds a stream KEEP") {
		t.Fatalf("restore over another stream: got %v, want a refusal", err)
	}
	if !natsbus.PendingExport(store) {
		t.Error("a refused restore removed the export")
	}
}

// TestClusteredStoreRestartsClustered: a store that was clustered before
// starts clustered again, its streams known to the meta group.
func TestClusteredStoreRestartsClustered(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	clustered := t.TempDir()
	first := startMember(t, natsbus.ServerConfig{ServerName: "a", StoreDir: clustered, ClusterListen: "127.0.0.1:-1"})
	startMember(t, natsbus.ServerConfig{ServerName: "b", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://" + first.ClusterAddr().String()}})
	ncA := connect(t, first)
	if err := natsbus.WaitJetStream(ctx, ncA); err != nil {
		t.Fatal(err)
	}
	jsA, _ := jetstream.New(ncA)
	if _, err := jsA.CreateStream(ctx, jetstream.StreamConfig{Name: "C", Subjects: []string{"c"}}); err != nil {
		t.Fatal(err)
	}
	addr := first.ClusterAddr().String()
	first.Shutdown()
	first.WaitForShutdown()
	again := startMember(t, natsbus.ServerConfig{ServerName: "a", StoreDir: clustered, ClusterListen: addr})
	if natsbus.PendingExport(clustered) {
		t.Error("a clustered store was exported as a standalone one")
	}
	ncAgain := connect(t, again)
	if err := natsbus.WaitJetStream(ctx, ncAgain); err != nil {
		t.Fatalf("restarted first member: %v", err)
	}
	jsAgain, _ := jetstream.New(ncAgain)
	if _, err := jsAgain.Stream(ctx, "C"); err != nil {
		t.Fatalf("stream C after the first member's restart: %v", err)
	}
}

func TestServerConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  natsbus.ServerConfig
		want []string
	}{
		{"listen without port", natsbus.ServerConfig{Listen: "127.0.0.1"}, []string{"listen address", "want host:port"}},
		{"cluster listen without port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "0.0.0.0"}, []string{"cluster listen address", "want host:port"}},
		{"cluster port 0", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:0"}, []string{"cluster listen address", "-1 for a free one"}},
		{"cluster port too big", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:70000"}, []string{"bad port"}},
		{"route not nats", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"http://10.0.0.1:6222"}}, []string{"want scheme nats://"}},
		{"route bare host", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"10.0.0.1:6222"}}, []string{"route \"10.0.0.1:6222\""}},
		{"route without port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://10.0.0.1"}}, []string{"no port", "nats://10.0.0.1:6222"}},
		{"route without host", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://:6222"}}, []string{"no host"}},
		{"route with path", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://10.0.0.1:6222/x"}}, []string{"only nats://host:port"}},
		{"routes without cluster listener", natsbus.ServerConfig{ServerName: "n", Routes: []string{"nats://10.0.0.1:6222"}}, []string{"set ClusterListen"}},
		{"advertise without cluster listener", natsbus.ServerConfig{ServerName: "n", ClusterAdvertise: "10.0.0.1:6222"}, []string{"needs a cluster listener"}},
		{"advertise without port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", ClusterAdvertise: "10.0.0.1"}, []string{"cluster advertise address"}},
		{"advertise free port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", ClusterAdvertise: "10.0.0.1:-1"}, []string{"cluster advertise address"}},
		{"cluster member without name", natsbus.ServerConfig{ClusterListen: "127.0.0.1:-1"}, []string{"needs a ServerName unique in the cluster"}},
		{"server name with space", natsbus.ServerConfig{ServerName: "node 1"}, []string{"server name \"node 1\""}},
		{"server name with wildcard", natsbus.ServerConfig{ServerName: "node*"}, []string{"server name"}},
		{"cluster name too long", natsbus.ServerConfig{ClusterName: strings.Repeat("c", 65)}, []string{"cluster name"}},
		{"every problem at once", natsbus.ServerConfig{ServerName: "a b", ClusterListen: "x", Routes: []string{"tls://h:1"}}, []string{"server name", "cluster listen address", "want scheme nats://"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if err == nil {
				t.Fatal("Validate: got nil, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate: got %q, want it to contain %q", err, w)
				}
			}
			// StartServer refuses it too, before listening on anything.
			cfg := tc.cfg
			cfg.StoreDir = t.TempDir()
			if srv, err := natsbus.StartServer(t.Context(), cfg); err == nil {
				srv.Shutdown()
				t.Fatal("StartServer: got nil error")
			}
		})
	}
	for _, ok := range []natsbus.ServerConfig{
		{},
		{ServerName: "node-1.example.com", ClusterName: "kuma_eu", ClusterListen: "0.0.0.0:6222", Routes: []string{"nats://10.0.0.1:6222", "nats://[::1]:6222", "nats://peer.example.com:6222"}},
		{ServerName: "n", ClusterListen: "[::]:-1"},
		{ServerName: "n", ClusterListen: "0.0.0.0:6222", ClusterAdvertise: "kuma1.example.com:16222"},
	} {
		if err := ok.Validate(); err != nil {
			t.Errorf("Validate(%+v): got %v, want nil", ok, err)
		}
	}
}

// ExampleJetStreamPeers shows how a service picks the replicas of what it
// creates.
func ExampleJetStreamPeers() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "kuma-example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	srv, err := natsbus.StartServer(ctx, natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: dir})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer srv.WaitForShutdown()
	defer srv.Shutdown()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer nc.Close()
	if err := natsbus.WaitJetStream(ctx, nc); err != nil {
		fmt.Println(err)
		return
	}
	peers, err := natsbus.JetStreamPeers(ctx, nc)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("peers", peers, "replicas", natsbus.Replicas(peers))
	// Output: peers 1 replicas 1
}
