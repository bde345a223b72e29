package app_test

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// TestNATSTargetClusterOfThree runs `kuma serve --target nats` three times
// in this process: the embedded server alone, joined into one NATS cluster
// with kuma up's cluster settings. A keyvault, a shardnode and a router run
// apart against it (the microservices layout of
// deployments/compose/docker-compose.micro.yml), and an append made through
// one server is read through another.
func TestNATSTargetClusterOfThree(t *testing.T) {
	if testing.Short() {
		t.Skip("forms a NATS cluster of three: seconds")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	quiet := slog.New(slog.DiscardHandler)
	newNATS := func(name string, join []string) *app.App {
		t.Helper()
		a, err := app.New(app.Config{Target: app.TargetNATS, NodeName: name, DataDir: t.TempDir(),
			NATS: natsbus.ServerConfig{Listen: "127.0.0.1:-1", ClusterListen: "127.0.0.1:-1", Routes: join}, MetricsListen: "127.0.0.1:0", Logger: quiet})
		if err != nil {
			t.Fatalf("app.New %s: %v", name, err)
		}
		return a
	}
	stop := func(a *app.App) {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = a.Stop(sctx)
	}
	n1 := newNATS("n1", nil)
	started1 := make(chan error, 1)
	go func() { started1 <- n1.Start(ctx) }()
	t.Cleanup(func() { stop(n1) })
	var route string
	for route = n1.ClusterAddr(); route == ""; route = n1.ClusterAddr() {
		time.Sleep(10 * time.Millisecond)
	}
	n2 := newNATS("n2", []string{"nats://" + route})
	if err := n2.Start(ctx); err != nil {
		t.Fatalf("n2: %v", err)
	}
	t.Cleanup(func() { stop(n2) })
	if err := <-started1; err != nil {
		t.Fatalf("n1: %v", err)
	}
	n3 := newNATS("n3", []string{"nats://" + route, "nats://" + n2.ClusterAddr()})
	if err := n3.Start(ctx); err != nil {
		t.Fatalf("n3: %v", err)
	}
	t.Cleanup(func() { stop(n3) })
	for _, n := range []*app.App{n1, n2, n3} {
		if n.Shardnode() != nil || n.Projector() != nil || n.MetricsAddr() == "" {
			t.Fatalf("target nats runs shardnode %v, projector %v, metrics at %q; want the server and its health only",
				n.Shardnode() != nil, n.Projector() != nil, n.MetricsAddr())
		}
		code, body := get(t, "http://"+n.MetricsAddr()+"/readyz")
		if code != 200 {
			t.Fatalf("target nats /readyz = %d %q", code, body)
		}
	}

	data := filepath.Join(t.TempDir(), "services")
	key := envelope.NewRandomKey()
	for _, target := range []string{app.ModuleKeyvault, app.ModuleShardnode, app.ModuleRouter} {
		a, err := app.New(app.Config{Target: target, NATSURL: n3.ClientURL(), DataDir: data, Shards: 4, MasterKey: key, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Start(ctx); err != nil {
			t.Fatalf("start %s against the nats target: %v", target, err)
		}
		t.Cleanup(func() { stop(a) })
	}
	connect := func(a *app.App) *client.Client {
		nc, err := nats.Connect(a.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		c, _ := client.New(nc, client.Options{})
		return c
	}
	if _, err := connect(n1).Append(ctx, "micro-1", []kuma.EventInput{{Type: "Created", Data: []byte(`{"n":1}`)}}); err != nil {
		t.Fatalf("append through n1: %v", err)
	}
	r, err := connect(n2).Read(ctx, "micro-1")
	if err != nil || r.Version != 1 || string(r.State) != `{"n":1}` {
		t.Fatalf("read through n2 = %+v, %v", r, err)
	}

	// The cluster flags belong to the embedded server only.
	_, err = app.New(app.Config{Target: app.ModuleRouter, DataDir: t.TempDir(), NATS: natsbus.ServerConfig{Routes: []string{"nats://" + route}, ClusterListen: "127.0.0.1:-1"}})
	if err == nil || !strings.Contains(err.Error(), "--target nats") {
		t.Fatalf("router with --join: %v; want a refusal naming --target nats", err)
	}
}
