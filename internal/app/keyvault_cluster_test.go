package app_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestKeyvaultHasNoHomeNode runs three `kuma up` nodes in this process, each
// with its own keyvault instance (the default, --keyvault local) and one
// master key, sharing the replicated key bucket. With the first node, the
// one that created the bucket and the only keyvault of old, stopped,
// appends to new entities and forgets go on through the other two, and a
// forget made through one node is seen through the other.
func TestKeyvaultHasNoHomeNode(t *testing.T) {
	if testing.Short() {
		t.Skip("forms a NATS cluster of three and fails a node over: seconds")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	master := envelope.NewRandomKey()
	newNode := func(name string, join []string) *app.App {
		t.Helper()
		logger := slog.New(slog.DiscardHandler)
		if testing.Verbose() {
			logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
		}
		a, err := app.New(app.Config{
			NodeName: name, DataDir: t.TempDir(), Shards: 4, MasterKey: master,
			NATS:   natsbus.ServerConfig{Listen: "127.0.0.1:-1", ClusterListen: "127.0.0.1:-1", Routes: join},
			Logger: logger.With("node", name),
		})
		if err != nil {
			t.Fatalf("app.New %s: %v", name, err)
		}
		return a
	}
	stop := func(a *app.App, timeout time.Duration) error {
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return a.Stop(sctx)
	}
	n1 := newNode("n1", nil)
	started1 := make(chan error, 1)
	go func() { started1 <- n1.Start(ctx) }()
	var route string
	for route = n1.ClusterAddr(); route == ""; route = n1.ClusterAddr() {
		time.Sleep(10 * time.Millisecond)
	}
	route = "nats://" + route
	n2 := newNode("n2", []string{route})
	if err := n2.Start(ctx); err != nil {
		t.Fatalf("n2 start: %v", err)
	}
	if err := <-started1; err != nil {
		t.Fatalf("n1 start: %v", err)
	}
	n1Stopped := false
	t.Cleanup(func() {
		if !n1Stopped {
			_ = stop(n1, 30*time.Second)
		}
	})
	n3 := newNode("n3", []string{route})
	if err := n3.Start(ctx); err != nil {
		t.Fatalf("n3 start: %v", err)
	}
	// n3 and n2 stop at the end: the last one has no quorum, like in
	// TestJoinClusterOfThree, so their errors say nothing here.
	t.Cleanup(func() { _ = stop(n3, 10*time.Second) })
	t.Cleanup(func() { _ = stop(n2, 10*time.Second) })

	// The bucket was made while two servers were up (one replica); the
	// shardnodes raise it with the cluster, to three.
	js, err := jetstream.New(n2.Conn())
	if err != nil {
		t.Fatal(err)
	}
	for {
		st, err := js.Stream(ctx, "KV_"+cluster.KeysBucket)
		if err == nil {
			info := st.CachedInfo()
			if info.Config.Replicas == 3 && info.Cluster != nil && info.Cluster.Leader != "" && len(info.Cluster.Replicas) == 2 {
				break
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the key bucket never reached three placed replicas (last: %v)", err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	connect := func(a *app.App) *client.Client {
		nc, err := nats.Connect(a.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		c, err := client.New(nc, client.Options{Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c2, c3 := connect(n2), connect(n3)
	created := func(c *client.Client, entity string) error {
		_, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"n":1}`)}}, client.IdempotencyKey(entity))
		return err
	}
	for i := range 8 {
		if err := created(c2, fmt.Sprintf("before-%d", i)); err != nil {
			t.Fatalf("append before the stop: %v", err)
		}
	}

	if err := stop(n1, 30*time.Second); err != nil {
		t.Logf("stop n1: %v", err)
	}
	n1Stopped = true
	stopped := time.Now()

	// Every new entity is accepted through both nodes, once n1's shards
	// have moved (an entity of one of them answers unavailable until then).
	for i := range 16 {
		for j, c := range []*client.Client{c2, c3} {
			e := fmt.Sprintf("after-%d-%d", i, j)
			for {
				err := created(c, e)
				if err == nil {
					break
				}
				if !errors.Is(err, kuma.ErrUnavailable) && !errors.Is(err, kuma.ErrTimeout) || ctx.Err() != nil {
					t.Fatalf("append to new entity %s through n%d, %v after n1 stopped: %v", e, j+2, time.Since(stopped), err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	t.Logf("32 new entities accepted through n2 and n3 within %v of n1's stop", time.Since(stopped).Round(time.Millisecond))

	// A forget through n2 holds through n3, for old and new entities.
	for _, e := range []string{"before-3", "after-5-1"} {
		if _, err := c2.Forget(ctx, e, "test", "dpo"); err != nil {
			t.Fatalf("forget %s through n2: %v", e, err)
		}
		if _, err := c3.Read(ctx, e); !errors.Is(err, kuma.ErrEntityForgotten) {
			t.Errorf("read of forgotten %s through n3: got %v, want entity_forgotten", e, err)
		}
		if err := created(c3, e); !errors.Is(err, kuma.ErrEntityForgotten) {
			t.Errorf("append to forgotten %s through n3: got %v, want entity_forgotten", e, err)
		}
	}
	if _, err := c3.Read(ctx, "before-4"); err != nil {
		t.Errorf("read of an entity written before the stop, through n3: %v", err)
	}
}
