package app_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
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
