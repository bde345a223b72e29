package app_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/services/router"
	"github.com/prometheus/client_golang/prometheus"
)

// TestShardnodeWithAnotherShardCountRefused: a shardnode configured with
// another shard count than the cluster's context is refused at start,
// with the count to use, and the cluster goes on serving.
func TestShardnodeWithAnotherShardCountRefused(t *testing.T) {
	first := kumatest.Start(t, func(c *app.Config) { c.NodeName = "n1"; c.Shards = 4 })
	for _, shards := range []int{8, 4} {
		a, err := app.New(app.Config{Target: app.ModuleShardnode, NodeName: "n2", DataDir: t.TempDir(), Shards: shards,
			NATSURL: first.App.ClientURL(), Logger: first.Cfg.Logger})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = a.Start(ctx)
		cancel()
		if shards == 8 {
			if err == nil || !strings.Contains(err.Error(), "has 4 shards in this cluster") || !strings.Contains(err.Error(), "--shards 4") {
				t.Fatalf("a shardnode with 8 shards joining a context of 4: %v", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("a shardnode with the cluster's 4 shards: %v", err)
		}
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := a.Stop(sctx); err != nil {
			t.Errorf("stop n2: %v", err)
		}
		cancel()
	}
	c := first.Client(client.Options{Timeout: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Append(ctx, "still-served", []kuma.EventInput{{Type: "Tick", Data: []byte(`{}`)}}); err != nil {
		t.Fatalf("the cluster after the refusal: %v", err)
	}
}

// TestShardCountIsTheContexts: with no --shards (0), a node uses the count
// the context already has: its data dir's on a restart, the cluster's when
// it joins, DefaultShards for a new context. A router started without a
// count asks a shardnode and places entities as the shardnodes do. So the
// default can change without refusing data made under the old one.
func TestShardCountIsTheContexts(t *testing.T) {
	dir := t.TempDir()
	first := kumatest.Start(t, func(c *app.Config) { c.NodeName = "n1"; c.DataDir = dir; c.Shards = 8 })
	c := first.Client(client.Options{Timeout: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := c.Append(ctx, "before-restart", []kuma.EventInput{{Type: "Tick", Data: []byte(`{"n":1}`)}}); err != nil {
		t.Fatal(err)
	}

	// The restart with no count takes the data dir's.
	first.Stop()
	first.Cfg.Shards = 0
	first.Restart()
	if got := first.App.Shards(); got != 8 {
		t.Fatalf("a restart without --shards on a dir of 8 shards serves %d", got)
	}
	c = first.Client(client.Options{Timeout: 10 * time.Second})
	if st, err := c.Read(ctx, "before-restart"); err != nil || st.Version != 1 {
		t.Fatalf("the entity written before the restart: %+v, %v", st, err)
	}

	// A shardnode joining without a count takes the cluster's.
	joiner, err := app.New(app.Config{Target: app.ModuleShardnode, NodeName: "n2", DataDir: t.TempDir(),
		NATSURL: first.App.ClientURL(), Logger: first.Cfg.Logger})
	if err != nil {
		t.Fatal(err)
	}
	if err := joiner.Start(ctx); err != nil {
		t.Fatalf("a shardnode joining without --shards: %v", err)
	}
	defer func() {
		if err := joiner.Stop(context.Background()); err != nil {
			t.Errorf("stop n2: %v", err)
		}
	}()
	if got := joiner.Shards(); got != 8 {
		t.Fatalf("a shardnode joining a context of 8 shards without --shards serves %d", got)
	}

	// A router alone, without a count, asks a shardnode and routes as
	// they place: each entity is served by the shard its xxhash names
	// (a shard refuses an entity that is not its own). It shares the
	// queue group with the node's own router, so it takes about half.
	reg := prometheus.NewRegistry()
	rt, err := router.New(router.Config{Contexts: map[string]int{"default": 0}, Registerer: reg}, first.NC)
	if err != nil {
		t.Fatal(err)
	}
	if err := rt.Start(ctx); err != nil {
		t.Fatalf("a router without a shard count: %v", err)
	}
	defer func() {
		if err := rt.Stop(context.Background()); err != nil {
			t.Errorf("stop the router: %v", err)
		}
	}()
	for i := 0; i < 40; i++ {
		id := fmt.Sprintf("routed-%d", i)
		if _, err := c.Append(ctx, id, []kuma.EventInput{{Type: "Tick", Data: []byte(`{"n":1}`)}}); err != nil {
			t.Fatalf("append %s, perhaps through a router that asked for the count: %v", id, err)
		}
	}
	if got := counter(t, reg, "kuma_router_forwarded_total"); got == 0 {
		t.Fatal("the router without a count forwarded none of 40 appends")
	} else {
		t.Logf("the router that asked for the count forwarded %v of 40 appends", got)
	}
}

// counter reads a counter from a registry.
func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no counter %s", name)
	return 0
}

// TestNewContextTakesTheDefaultShardCount: a new data dir with no count
// is created with DefaultShards and records it.
func TestNewContextTakesTheDefaultShardCount(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Shards = 0 })
	if got := n.App.Shards(); got != app.DefaultShards {
		t.Fatalf("a new context without --shards has %d shards, want %d", got, app.DefaultShards)
	}
	n.Stop()
	n.Cfg.Shards = app.DefaultShards + 1
	a, err := app.New(n.Cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = a.Start(ctx)
	if err == nil {
		_ = a.Stop(ctx)
		t.Fatalf("a restart with --shards %d on a dir made with the default was not refused", app.DefaultShards+1)
	}
	if !strings.Contains(err.Error(), "was created with 16 shards") {
		t.Fatalf("refusal: %v", err)
	}
}
