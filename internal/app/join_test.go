package app_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestJoinClusterOfThree runs three `kuma up` nodes in this process, each
// with its own data dir and embedded NATS server: the first with a cluster
// listener only, which waits for a second member before its JetStream (and
// so its Start) can finish; the second and third joining it by its route
// address, with the first node's keyvault (--keyvault remote). All three
// reach JetStream, the event stream and the cluster buckets are raised to
// three replicas, and an append through the third node's NATS is read
// through the first's.
func TestJoinClusterOfThree(t *testing.T) {
	if testing.Short() {
		t.Skip("forms a NATS cluster of three and moves shards: seconds")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	var log1 kumatest.LogBuffer
	newNode := func(name string, join []string, keyvault string, logs *kumatest.LogBuffer) *app.App {
		t.Helper()
		var logger *slog.Logger
		switch {
		case logs != nil:
			logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
		case testing.Verbose():
			logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
		default:
			logger = slog.New(slog.DiscardHandler)
		}
		a, err := app.New(app.Config{
			NodeName: name, DataDir: t.TempDir(), Shards: 4,
			NATS:     natsbus.ServerConfig{Listen: "127.0.0.1:-1", ClusterListen: "127.0.0.1:-1", Routes: join},
			Keyvault: keyvault, Logger: logger.With("node", name),
		})
		if err != nil {
			t.Fatalf("app.New %s: %v", name, err)
		}
		return a
	}
	stopNode := func(a *app.App, timeout time.Duration) error {
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return a.Stop(sctx)
	}

	n1 := newNode("n1", nil, "", &log1)
	started1 := make(chan error, 1)
	go func() { started1 <- n1.Start(ctx) }()
	// The last one standing has no JetStream quorum (one of three), so its
	// shardnode cannot release its leases or leave; its Stop ends with
	// errors at its deadline, which say nothing about the join.
	t.Cleanup(func() {
		if err := stopNode(n1, 10*time.Second); err != nil {
			t.Logf("stop n1 without a quorum: %v", err)
		}
	})
	var route string
	for route = n1.ClusterAddr(); route == ""; route = n1.ClusterAddr() {
		select {
		case err := <-started1:
			t.Fatalf("n1 start ended before its cluster listener was known: %v", err)
		case <-ctx.Done():
			t.Fatalf("n1 cluster listener: %v", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	route = "nats://" + route
	// Alone, the first member has no JetStream, so its Start cannot be done.
	select {
	case err := <-started1:
		t.Fatalf("n1 start returned before a second member joined: %v", err)
	default:
	}

	n2 := newNode("n2", []string{route}, app.KeyvaultRemote, nil)
	if err := n2.Start(ctx); err != nil {
		t.Fatalf("n2 start: %v", err)
	}
	t.Cleanup(func() {
		if err := stopNode(n2, 30*time.Second); err != nil {
			t.Errorf("stop n2: %v", err)
		}
	})
	if err := <-started1; err != nil {
		t.Fatalf("n1 start: %v", err)
	}
	n3 := newNode("n3", []string{route}, app.KeyvaultRemote, nil)
	if err := n3.Start(ctx); err != nil {
		t.Fatalf("n3 start: %v", err)
	}
	t.Cleanup(func() {
		if err := stopNode(n3, 30*time.Second); err != nil {
			t.Errorf("stop n3: %v", err)
		}
	})

	if got := strings.Count(log1.String(), "JetStream waits for a second member"); got != 1 {
		t.Errorf("n1 logged the wait for a second member %d times, want 1; log:\n%s", got, log1.String())
	}
	nodes := []*app.App{n1, n2, n3}
	for i, a := range nodes {
		js, err := jetstream.New(a.Conn())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.AccountInfo(ctx); err != nil {
			t.Errorf("n%d: JetStream account info: %v", i+1, err)
		}
	}
	// Only n1 runs a keyvault (its keys file); the others ask it over NATS.
	for i, a := range nodes {
		_, err := os.Stat(filepath.Join(a.Config().DataDir, "keyvault"))
		if has := err == nil; has != (i == 0) {
			t.Errorf("n%d: keyvault dir present %v, want %v (stat: %v)", i+1, has, i == 0, err)
		}
	}

	// n3's start counted three JetStream servers and raised what n1 and n2
	// had created with one replica; the others would on their next round.
	js1, err := jetstream.New(n1.Conn())
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{kuma.StreamName("default"), "KV_" + cluster.MembersBucket, "KV_" + cluster.LeasesBucket, "OBJ_" + cluster.SnapshotsBucket} {
		var got int
		var placed int
		for {
			if st, err := js1.Stream(ctx, name); err == nil {
				info := st.CachedInfo()
				got = info.Config.Replicas
				if info.Cluster != nil && info.Cluster.Leader != "" {
					placed = 1 + len(info.Cluster.Replicas)
				}
			}
			if got == 3 && placed == 3 {
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("stream %s: %d replicas configured, %d placed; want 3 and 3", name, got, placed)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}

	// An append through n3's NATS server is read through n1's: the router
	// that takes it, the shard's owner and the keyvault (on n1) may each be
	// on any node.
	connect := func(a *app.App) *client.Client {
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
	c3, c1 := connect(n3), connect(n1)
	for _, entity := range []string{"user-1", "user-2", "user-3", "user-4", "user-5", "user-6"} {
		rep, err := c3.Append(ctx, entity, []kuma.EventInput{{Type: "UserCreated", Data: json.RawMessage(`{"name":"` + entity + `"}`)}},
			client.IdempotencyKey(entity+"-created"))
		if err != nil {
			t.Fatalf("append %s through n3: %v", entity, err)
		}
		if rep.LastVersion != 1 {
			t.Fatalf("append %s: got version %d, want 1", entity, rep.LastVersion)
		}
		got, err := c1.Read(ctx, entity)
		if err != nil {
			t.Fatalf("read %s through n1: %v", entity, err)
		}
		var state struct{ Name string }
		if err := json.Unmarshal(got.State, &state); err != nil || got.Version != 1 || state.Name != entity {
			t.Fatalf("read %s through n1: got version %d, state %s (%v); want 1 and name %q", entity, got.Version, got.State, err, entity)
		}
	}
}

// TestJoinRefusedBeforeAnythingStarts: cluster settings that cannot work, or
// that would expose the unauthenticated routes, are refused by New with the
// fix, and nothing is written to the data dir.
func TestJoinRefusedBeforeAnythingStarts(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  app.Config
		want []string
	}{
		{"join without a cluster listener",
			app.Config{NATS: natsbus.ServerConfig{Routes: []string{"nats://10.0.0.1:6222"}}},
			[]string{"--join needs --cluster-listen", "0.0.0.0:6222"}},
		{"cluster listener on the network without --insecure",
			app.Config{NATS: natsbus.ServerConfig{ClusterListen: "0.0.0.0:6222", Routes: []string{"nats://10.0.0.1:6222"}}},
			[]string{"--cluster-listen 0.0.0.0:6222 is not a loopback address", "--insecure"}},
		{"a route that is no URL",
			app.Config{NATS: natsbus.ServerConfig{ClusterListen: "127.0.0.1:6222", Routes: []string{"10.0.0.1:6222"}}},
			[]string{`route "10.0.0.1:6222"`, "nats://"}},
		{"join on a target without the embedded server",
			app.Config{Target: app.ModuleShardnode, NATS: natsbus.ServerConfig{ClusterListen: "127.0.0.1:6222"}},
			[]string{"--join and --cluster-listen are for kuma up"}},
		{"unknown keyvault place",
			app.Config{Keyvault: "elsewhere"},
			[]string{`--keyvault must be local`, `"elsewhere"`}},
		{"remote keyvault outside kuma up",
			app.Config{Target: app.ModuleShardnode, Keyvault: app.KeyvaultRemote},
			[]string{"--keyvault remote is for kuma up"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			tc.cfg.DataDir = dir
			tc.cfg.NodeName = "n1"
			a, err := app.New(tc.cfg)
			if err == nil {
				t.Fatalf("app.New: got an App, want an error containing %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error: got %q, want it to contain %q", err, w)
				}
			}
			if a != nil {
				t.Errorf("app.New returned an App with its error")
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("data dir after a refused config: stat %v, want not exist", err)
			}
		})
	}

	// The same listener with --insecure is accepted (and still nothing is
	// created before Start).
	dir := filepath.Join(t.TempDir(), "data")
	if _, err := app.New(app.Config{DataDir: dir, NodeName: "n1", NATS: natsbus.ServerConfig{ClusterListen: "0.0.0.0:6222"}, Insecure: true}); err != nil {
		t.Fatalf("app.New with --insecure: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("data dir after New: stat %v, want not exist", err)
	}
}
