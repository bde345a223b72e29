// Package kumatest starts real Kuma nodes for tests: an embedded nats-server
// on a free loopback port with JetStream under t.TempDir(), real SQLite shard
// files, and the same wiring as `kuma up`. Nothing is mocked.
package kumatest

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/services/shardnode"
	"github.com/nats-io/nats.go"
)

// Node is a running single-node Kuma.
type Node struct {
	T   testing.TB
	App *app.App
	Cfg app.Config
	// NC is a separate client connection over TCP, as an external client
	// would have.
	NC *nats.Conn
}

// Start runs a node on a fresh data dir (or cfg.DataDir when set) and stops
// it when the test ends. tune may adjust the config.
func Start(t testing.TB, tune func(*app.Config)) *Node {
	t.Helper()
	cfg := app.Config{
		DataDir: t.TempDir(),
		NATS:    natsbus.ServerConfig{Listen: "127.0.0.1:-1"},
		Shards:  4,
		Logger:  slog.New(slog.DiscardHandler),
	}
	if tune != nil {
		tune(&cfg)
	}
	n := &Node{T: t, Cfg: cfg}
	n.start()
	t.Cleanup(func() { n.Stop() })
	return n
}

func (n *Node) start() {
	n.T.Helper()
	a, err := app.New(n.Cfg)
	if err != nil {
		n.T.Fatalf("app.New: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		n.T.Fatalf("app.Start: %v", err)
	}
	nc, err := nats.Connect(a.ClientURL())
	if err != nil {
		n.T.Fatalf("connect: %v", err)
	}
	n.App, n.NC = a, nc
}

// Stop stops the node cleanly (idempotent).
func (n *Node) Stop() {
	if n.App == nil {
		return
	}
	n.NC.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.App.Stop(ctx); err != nil {
		n.T.Errorf("app.Stop: %v", err)
	}
	n.App, n.NC = nil, nil
}

// Restart stops the node and starts it again on the same data dir.
func (n *Node) Restart() {
	n.T.Helper()
	n.Stop()
	n.start()
}

// Client returns a Go client over the node's test connection.
func (n *Node) Client(opts client.Options) *client.Client {
	n.T.Helper()
	c, err := client.New(n.NC, opts)
	if err != nil {
		n.T.Fatalf("client.New: %v", err)
	}
	return c
}

// Shardnode returns the node's shardnode service.
func (n *Node) Shardnode() *shardnode.Service { return n.App.Shardnode() }
