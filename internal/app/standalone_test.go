package app_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// TestStandaloneNodeBecomesCluster: a node that ran `kuma up` without a
// cluster listener (entities written, one forgotten) is restarted with
// one, as the first member of a new cluster; once a second member joins,
// its streams are restored before anything starts, every acknowledged
// event reads back through either node, the forgotten entity stays
// forgotten, the projection answers as before, its keyvault's keys still
// open the events, and shards move to the second member and then to a
// third, where an entity written standalone can be forgotten.
func TestStandaloneNodeBecomesCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("forms a NATS cluster of three and moves shards: seconds")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	logger := func(name string, logs *kumatest.LogBuffer) *slog.Logger {
		if logs != nil {
			return slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", name)
		}
		if testing.Verbose() {
			return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", name)
		}
		return slog.New(slog.DiscardHandler)
	}
	newNode := func(cfg app.Config) *app.App {
		t.Helper()
		cfg.Shards, cfg.NATS.Listen = 8, "127.0.0.1:-1"
		if cfg.DataDir == "" {
			cfg.DataDir = t.TempDir()
		}
		a, err := app.New(cfg)
		if err != nil {
			t.Fatalf("app.New %s: %v", cfg.NodeName, err)
		}
		return a
	}
	stop := func(a *app.App, timeout time.Duration) error {
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return a.Stop(sctx)
	}
	connect := func(a *app.App) *client.Client {
		t.Helper()
		nc, err := nats.Connect(a.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		c, err := client.New(nc, client.Options{Timeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// Standalone: entities of one to three events, one forgotten.
	data := t.TempDir()
	alone := newNode(app.Config{NodeName: "n1", DataDir: data, Logger: logger("n1", nil)})
	if err := alone.Start(ctx); err != nil {
		t.Fatal(err)
	}
	c := connect(alone)
	const entities = 24
	const forgotten = "user-7"
	want := map[string][]string{} // entity → its events' data, in order
	for i := range entities {
		entity := fmt.Sprintf("user-%d", i)
		for v := 1; v <= 1+i%3; v++ {
			body := fmt.Sprintf(`{"n":%d,"v":%d}`, i, v)
			if _, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Changed", Data: json.RawMessage(body)}}); err != nil {
				t.Fatalf("append %s v%d: %v", entity, v, err)
			}
			want[entity] = append(want[entity], body)
		}
	}
	if _, err := c.Forget(ctx, forgotten, "test", ""); err != nil {
		t.Fatal(err)
	}
	delete(want, forgotten)
	last, err := c.Append(ctx, "user-0", []kuma.EventInput{{Type: "Changed", Data: json.RawMessage(`{"n":0,"v":2}`)}})
	if err != nil {
		t.Fatal(err)
	}
	want["user-0"] = append(want["user-0"], `{"n":0,"v":2}`)
	wait := 10000
	if q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: last.Position, WaitMS: &wait}); err != nil || len(q.Rows) != entities-1 {
		t.Fatalf("entities standalone: got %v rows (%v), want %d", q, err, entities-1)
	}
	if err := stop(alone, 30*time.Second); err != nil {
		t.Fatalf("stop standalone: %v", err)
	}

	// The same data dir as the first member of a cluster.
	var log1 kumatest.LogBuffer
	// Its start pauses before its shardnode, as a slow keyvault import
	// makes it: a member joining meanwhile must wait for it.
	n1 := newNode(app.Config{NodeName: "n1", DataDir: data, NATS: natsbus.ServerConfig{ClusterListen: "127.0.0.1:-1"}, Logger: logger("n1", &log1),
		Failpoint: func(name string) {
			if name == "start-before-shardnode" {
				time.Sleep(3 * time.Second)
			}
		}})
	started1 := make(chan error, 1)
	go func() { started1 <- n1.Start(ctx) }()
	t.Cleanup(func() {
		if err := stop(n1, 10*time.Second); err != nil {
			t.Logf("stop n1 (the last one without a quorum): %v", err)
		}
	})
	var route string
	for route = n1.ClusterAddr(); route == ""; route = n1.ClusterAddr() {
		select {
		case err := <-started1:
			t.Fatalf("n1 start ended before its cluster listener was known: %v\n%s", err, log1.String())
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	route = "nats://" + route
	n2 := newNode(app.Config{NodeName: "n2", NATS: natsbus.ServerConfig{ClusterListen: "127.0.0.1:-1", Routes: []string{route}}, Keyvault: app.KeyvaultRemote, Logger: logger("n2", nil)})
	if err := n2.Start(ctx); err != nil {
		t.Fatalf("n2 start: %v", err)
	}
	t.Cleanup(func() {
		if err := stop(n2, 30*time.Second); err != nil {
			t.Errorf("stop n2: %v", err)
		}
	})
	// n2 waits for n1's whole start, not only for its streams: until n1's
	// shardnode heartbeats, the restored leases name a node that looks
	// dead, and n2 would take n1's shards over without what n1 had not
	// published.
	select {
	case err := <-started1:
		if err != nil {
			t.Fatalf("n1 start: %v\n%s", err, log1.String())
		}
	default:
		t.Fatalf("n2 finished starting while n1 was still starting:\n%s", log1.String())
	}
	for _, line := range []string{"exported the standalone JetStream store", "carried the standalone node's streams into the cluster"} {
		if !strings.Contains(log1.String(), line) {
			t.Errorf("n1's log lacks %q:\n%s", line, log1.String())
		}
	}
	if _, err := os.Stat(filepath.Join(data, "nats", "jetstream.standalone")); err != nil {
		t.Errorf("the standalone store was not kept aside: %v", err)
	}

	c1, c2 := connect(n1), connect(n2)
	check := func(who string, c *client.Client) {
		t.Helper()
		for entity, events := range want {
			h, err := c.History(ctx, entity, 1, 100)
			if err != nil {
				t.Fatalf("%s: history %s: %v", who, entity, err)
			}
			if len(h.Events) != len(events) {
				t.Fatalf("%s: history %s: got %d events, want %d", who, entity, len(h.Events), len(events))
			}
			for i, e := range h.Events {
				if string(e.Data) != events[i] || e.Version != int64(i+1) {
					t.Errorf("%s: %s event %d: got v%d %s, want v%d %s", who, entity, i, e.Version, e.Data, i+1, events[i])
				}
			}
		}
		if _, err := c.Read(ctx, forgotten); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
			t.Errorf("%s: read %s: got %v, want entity_forgotten", who, forgotten, err)
		}
		if _, err := c.Append(ctx, forgotten, []kuma.EventInput{{Type: "Changed", Data: json.RawMessage(`{}`)}}); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
			t.Errorf("%s: append to %s: got %v, want entity_forgotten", who, forgotten, err)
		}
	}
	check("n2", c2)
	if q, err := c2.Query(ctx, "entities", &kuma.QueryRequest{After: last.Position, WaitMS: &wait}); err != nil || len(q.Rows) != entities-1 {
		t.Fatalf("entities through n2: got %v (%v), want %d rows", q, err, entities-1)
	}
	// A new entity needs a new key from the keyvault kept on n1.
	if _, err := c2.Append(ctx, "user-new", []kuma.EventInput{{Type: "Changed", Data: json.RawMessage(`{"new":true}`)}}); err != nil {
		t.Fatalf("append a new entity through n2: %v", err)
	}
	want["user-new"] = []string{`{"new":true}`}

	owns := func(a *app.App) int { return len(a.Shardnode().Stats()) }
	eventually := func(what string, cond func() bool) {
		t.Helper()
		for !cond() {
			select {
			case <-ctx.Done():
				t.Fatalf("%s: %v", what, ctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	eventually("shards moving to n2", func() bool { return owns(n2) > 0 })
	check("n1 after shards moved to n2", c1)

	n3 := newNode(app.Config{NodeName: "n3", NATS: natsbus.ServerConfig{ClusterListen: "127.0.0.1:-1", Routes: []string{route, "nats://" + n2.ClusterAddr()}},
		Keyvault: app.KeyvaultRemote, Logger: logger("n3", nil)})
	if err := n3.Start(ctx); err != nil {
		t.Fatalf("n3 start: %v", err)
	}
	t.Cleanup(func() {
		if err := stop(n3, 30*time.Second); err != nil {
			t.Errorf("stop n3: %v", err)
		}
	})
	eventually("shards moving to n3", func() bool { return owns(n3) > 0 })
	c3 := connect(n3)
	check("n3", c3)
	// An entity written standalone can be forgotten in the cluster: its key
	// is in the keyvault the node kept.
	if _, err := c3.Forget(ctx, "user-1", "test", ""); err != nil {
		t.Fatalf("forget user-1 through n3: %v", err)
	}
	if _, err := c1.Read(ctx, "user-1"); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
		t.Errorf("read user-1 through n1 after its forget: got %v, want entity_forgotten", err)
	}
	t.Logf("shards: n1 %d, n2 %d, n3 %d", owns(n1), owns(n2), owns(n3))
}

// TestPendingExportRefusedStandalone: a node whose standalone streams were
// exported for a cluster, and stopped before a second member joined, is
// refused a standalone start (its store has a meta group now, whose next
// clustered start would delete streams restored into it standalone), with
// the way back.
func TestPendingExportRefusedStandalone(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	data := t.TempDir()
	if err := os.MkdirAll(filepath.Join(data, "nats", "standalone-export"), 0o700); err != nil {
		t.Fatal(err)
	}
	a, err := app.New(app.Config{NodeName: "n1", DataDir: data, NATS: natsbus.ServerConfig{Listen: "127.0.0.1:-1"}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Start(ctx)
	if err == nil {
		_ = a.Stop(ctx)
		t.Fatal("a standalone start with a pending export: got nil, want a refusal")
	}
	for _, w := range []string{"--cluster-listen again", "jetstream.standalone"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("refusal %q: want it to contain %q", err, w)
		}
	}
	if _, err := os.Stat(filepath.Join(data, "nats", "standalone-export")); err != nil {
		t.Errorf("the export is gone after the refusal: %v", err)
	}
}
