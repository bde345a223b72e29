//go:build cluster

// The in-process join test runs with -tags cluster, next to the
// multi-process cluster tests in cmd/kuma (.ci/run runs both): it moves
// shards between three nodes under load for several seconds.

package app_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestShardnodesJoinUnderLoad: one node serves every shard while 40 writers
// append; two more shardnodes join (pointing at the same NATS) and take
// over the shards rendezvous hashing gives them, live. No client request
// fails, and afterwards every acknowledged event is there once with
// contiguous versions.
func TestShardnodesJoinUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("moves shards between three nodes: seconds")
	}
	first := kumatest.Start(t, func(c *app.Config) {
		c.NodeName = "n1"
		c.Shards = 8
		if testing.Verbose() {
			c.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
		}
	})
	c, err := client.New(first.NC, client.Options{Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	acked := map[string]int64{}
	var failed, acks atomic.Int64
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := 0; w < 40; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			entity := fmt.Sprintf("acct-%d", w)
			for i := 0; !stop.Load(); i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				rep, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}},
					client.IdempotencyKey(fmt.Sprintf("%s-%d", entity, i)))
				cancel()
				if err != nil {
					failed.Add(1)
					t.Errorf("append %s #%d: %v", entity, i, err)
					return
				}
				acks.Add(1)
				mu.Lock()
				acked[entity] = max(acked[entity], rep.LastVersion)
				mu.Unlock()
			}
		}(w)
	}
	for acks.Load() < 300 {
		time.Sleep(10 * time.Millisecond)
	}
	var joined []*app.App
	for _, name := range []string{"n2", "n3"} {
		a, err := app.New(app.Config{Target: app.ModuleShardnode, NodeName: name, DataDir: t.TempDir(), Shards: 8,
			NATSURL: first.App.ClientURL(), Logger: first.Cfg.Logger})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := a.Start(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		joined = append(joined, a)
	}
	// Wait until each newcomer serves shards (hand-offs are a few at a time).
	deadline := time.Now().Add(60 * time.Second)
	for {
		n2, n3 := len(joined[0].Shardnode().Stats()), len(joined[1].Shardnode().Stats())
		n1 := len(first.App.Shardnode().Stats())
		if n2 > 0 && n3 > 0 && n1+n2+n3 == 8 && len(first.App.Shardnode().Moves()) == 0 {
			t.Logf("shards after the join: n1 %d, n2 %d, n3 %d (%d appends acknowledged)", n1, n2, n3, acks.Load())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("shards did not settle: n1 %d, n2 %d, n3 %d", n1, n2, n3)
		}
		time.Sleep(50 * time.Millisecond)
	}
	before := acks.Load()
	for acks.Load() < before+300 {
		time.Sleep(10 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d client requests failed during the moves", failed.Load())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for entity, v := range acked {
		h, err := c.History(ctx, entity, 1, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(h.Events)) < v {
			t.Fatalf("%s: %d events, %d acknowledged", entity, len(h.Events), v)
		}
		for i, e := range h.Events {
			if e.Version != int64(i+1) {
				t.Fatalf("%s: version %d at index %d", entity, e.Version, i)
			}
		}
	}
	for _, a := range joined {
		sctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if err := a.Stop(sctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		cancel()
	}
}
