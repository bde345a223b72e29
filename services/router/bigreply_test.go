package router_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// routedPair starts two routed NATS servers (no JetStream) whose max
// payloads differ: a cluster whose members were configured apart.
func routedPair(t *testing.T, bigMax, smallMax int32) (big, small *server.Server) {
	t.Helper()
	start := func(maxPayload int32, routes string) *server.Server {
		opts := &server.Options{Host: "127.0.0.1", Port: -1, MaxPayload: maxPayload, NoLog: true, NoSigs: true,
			Cluster: server.ClusterOpts{Name: "pair", Host: "127.0.0.1", Port: -1}}
		if routes != "" {
			opts.Routes = server.RoutesFromStr(routes)
		}
		s, err := server.NewServer(opts)
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats server not ready")
		}
		t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
		return s
	}
	big = start(bigMax, "")
	small = start(smallMax, fmt.Sprintf("nats://%s", big.ClusterAddr().String()))
	deadline := time.Now().Add(10 * time.Second)
	for big.NumRoutes() == 0 || small.NumRoutes() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the servers did not route")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return big, small
}

// TestAnswerTheRouterCannotRelay: the owner's answer fits its own server
// but not the router's (members with different max payloads). The router
// cannot pass it on; the client gets payload_too_large at once instead of
// waiting out its timeout.
func TestAnswerTheRouterCannotRelay(t *testing.T) {
	big, small := routedPair(t, 4<<20, 256<<10)
	connect := func(s *server.Server) *nats.Conn {
		nc, err := nats.Connect(s.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	nc, rc := connect(big), connect(small)
	r := startRouterOn(t, rc, nil)
	owner(t, nc, "e-1", func(_ int64, m *nats.Msg) *nats.Msg {
		return &nats.Msg{Data: make([]byte, 1<<20)}
	})
	// Both servers know the router's subscriptions before the request.
	deadline := time.Now().Add(10 * time.Second)
	for big.NumSubscriptions() < small.NumSubscriptions() {
		if time.Now().After(deadline) {
			t.Fatal("subscriptions did not propagate")
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	msg, err := nc.RequestWithContext(ctx, kuma.EntitySubject(kuma.DefaultContext, kuma.OpRead, "e-1"), []byte(`{}`))
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	if code := kuma.ErrorCode(natsbus.ReplyError(msg)); code != kuma.CodePayloadTooLarge {
		t.Fatalf("answer of %d bytes, error %v; want payload_too_large", len(msg.Data), natsbus.ReplyError(msg))
	}
	if r.RelayFailed() != 1 || r.Pending() != 0 {
		t.Fatalf("relay failed %d pending %d, want 1 and 0", r.RelayFailed(), r.Pending())
	}
}
