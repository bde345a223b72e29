package natsbus_test

import (
	"context"
	"errors"
	"fmt"
	"os"
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

func TestReplicas(t *testing.T) {
	for _, tc := range []struct{ peers, want int }{{0, 1}, {1, 1}, {2, 1}, {3, 3}, {4, 3}, {7, 3}} {
		if got := natsbus.Replicas(tc.peers); got != tc.want {
			t.Errorf("Replicas(%d) = %d, want %d", tc.peers, got, tc.want)
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
