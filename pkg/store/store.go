// Package store is Kuma's embedding API: start a whole single-node Kuma
// (embedded NATS, router, shardnode) inside a Go program and use entities
// through handles.
//
//	s, err := store.Start(ctx, "./data", store.Shards(16))
//	defer s.Close(ctx)
//	user := s.Entity("user_0x9A4F")
//	_, err = user.Append(ctx, kuma.EventInput{Type: "UserCreated", Data: json.RawMessage(`{"name":"Dwighson"}`)})
//	state, err := user.Read(ctx)
//
// Other processes reach the same store over NATS at ClientURL().
package store

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// Option configures Start.
type Option func(*app.Config)

// Shards sets the context's shard count (default 16). It is fixed when the
// data dir is created.
func Shards(n int) Option { return func(c *app.Config) { c.Shards = n } }

// Context names the context (default "default").
func Context(name string) Option { return func(c *app.Config) { c.Context = name } }

// Reducer registers the context's reducer (default JSON Merge Patch).
func Reducer(r kuma.Reducer) Option {
	return func(c *app.Config) {
		if c.Reducers == nil {
			c.Reducers = map[string]kuma.Reducer{}
		}
		c.Reducers[c.Context] = r
	}
}

// NATSListen sets where the embedded NATS server listens (default a free
// loopback port, so an embedding program never collides with a `kuma up`).
func NATSListen(addr string) Option { return func(c *app.Config) { c.NATS.Listen = addr } }

// Logger sets the logger.
func Logger(l *slog.Logger) Option { return func(c *app.Config) { c.Logger = l } }

// Tune applies any other setting of the process config.
func Tune(f func(*app.Config)) Option { return Option(f) }

// Store is a running embedded Kuma. Its methods are safe for concurrent use.
type Store struct {
	app    *app.App
	nc     *nats.Conn
	client *client.Client
}

// Start starts Kuma on dir. Options apply in order; Reducer applies to the
// context named before it.
func Start(ctx context.Context, dir string, opts ...Option) (*Store, error) {
	cfg := app.Config{DataDir: dir, NATS: natsbus.ServerConfig{Listen: "127.0.0.1:-1"}, Target: app.TargetAll}
	for _, o := range opts {
		o(&cfg)
	}
	a, err := app.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := a.Start(ctx); err != nil {
		return nil, err
	}
	c, err := client.New(a.Conn(), client.Options{Context: a.Config().Context, DirectShards: a.Config().Shards})
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return &Store{app: a, nc: a.Conn(), client: c}, nil
}

// Client returns the store's client (direct routing, no router hop).
func (s *Store) Client() *client.Client { return s.client }

// ClientURL is where other processes reach this store's NATS.
func (s *Store) ClientURL() string { return s.app.ClientURL() }

// Close stops the store: in-flight commits finish and files are closed.
func (s *Store) Close(ctx context.Context) error { return s.app.Stop(ctx) }

// Entity returns a handle on one entity. It does no I/O; the id is checked on
// first use.
func (s *Store) Entity(id string) *Entity { return &Entity{s: s, id: id} }

// Entity is a handle on one entity.
type Entity struct {
	s  *Store
	id string
}

// ID is the entity's id.
func (e *Entity) ID() string { return e.id }

// Append appends events atomically.
func (e *Entity) Append(ctx context.Context, events ...kuma.EventInput) (*kuma.AppendReply, error) {
	return e.s.client.Append(ctx, e.id, events)
}

// AppendWith appends events with options such as client.ExpectVersion.
func (e *Entity) AppendWith(ctx context.Context, events []kuma.EventInput, opts ...client.AppendOption) (*kuma.AppendReply, error) {
	return e.s.client.Append(ctx, e.id, events, opts...)
}

// Read returns the state now, or at client.AtVersion / client.AtTime.
func (e *Entity) Read(ctx context.Context, opts ...client.ReadOption) (*kuma.ReadReply, error) {
	return e.s.client.Read(ctx, e.id, opts...)
}

// History returns up to limit events from fromVersion, following the
// server's pages (cut by size as well as by count) as client.History does.
func (e *Entity) History(ctx context.Context, fromVersion int64, limit int) (*kuma.HistoryReply, error) {
	return e.s.client.History(ctx, e.id, fromVersion, limit)
}
