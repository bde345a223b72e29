package app_test

// The client against services wired by hand: these tests start a router or
// a shardnode of their own, which is the wiring's business, so they live
// here rather than in pkg/client (a pkg/ package imports no service).

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/kumadb/kuma/services/router"
	"github.com/kumadb/kuma/services/shardnode"
	"github.com/nats-io/nats.go"
)

// TestRetriesUntilShardOwnerAppears starts a bare NATS server and a router
// with no shardnode: the client's append gets no responders, keeps retrying
// with the same idempotency key, and succeeds once the shardnode starts.
func TestRetriesUntilShardOwnerAppears(t *testing.T) {
	ctx := t.Context()
	_, nc := kumatest.NATS(t)
	r, err := router.New(router.Config{Contexts: map[string]int{"default": 2}}, nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer r.Stop(ctx)

	c, err := client.New(nc, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	var rep *kuma.AppendReply
	go func() {
		var err error
		rep, err = c.Append(ctx, "late", []kuma.EventInput{{Type: "Created"}}, client.IdempotencyKey("k-late"))
		done <- err
	}()
	time.Sleep(300 * time.Millisecond) // several retries happen meanwhile
	select {
	case err := <-done:
		t.Fatalf("append finished with no shardnode: %v", err)
	default:
	}
	kv, err := keyvault.New(keyvault.Config{Path: filepath.Join(t.TempDir(), "keys.db"), MasterKey: envelope.NewRandomKey()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer kv.Stop(context.Background())
	sn, err := shardnode.New(shardnode.Config{
		Keys:     kv,
		DataDir:  filepath.Join(t.TempDir(), "data"),
		Contexts: []shardnode.ContextConfig{{Name: "default", Shards: 2}},
		Logger:   slog.New(slog.DiscardHandler),
	}, nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer sn.Stop(context.Background())
	if err := <-done; err != nil {
		t.Fatalf("append after the shardnode came: %v", err)
	}
	if rep.FirstVersion != 1 || rep.Duplicate {
		t.Fatalf("reply = %+v, want the first and only append", rep)
	}
	// Exactly one event despite the retries.
	h, err := c.History(ctx, "late", 1, 10)
	if err != nil || len(h.Events) != 1 {
		t.Fatalf("history = %+v, %v; want one event", h, err)
	}
}

// TestSeveralRoutersShareTheLoad runs a second router on its own connection:
// both forward (queue group) and every request is answered once.
func TestSeveralRoutersShareTheLoad(t *testing.T) {
	n := kumatest.Start(t, nil)
	nc2, err := nats.Connect(n.App.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	r2, err := router.New(router.Config{Contexts: map[string]int{"default": n.Cfg.Shards}}, nc2)
	if err != nil {
		t.Fatal(err)
	}
	if err := r2.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer r2.Stop(t.Context())
	c := n.Client(client.Options{})
	for i := 0; i < 200; i++ {
		if _, err := c.Append(t.Context(), "shared", []kuma.EventInput{{Type: "E"}}); err != nil {
			t.Fatal(err)
		}
	}
	r, err := c.Read(t.Context(), "shared")
	if err != nil || r.Version != 200 {
		t.Fatalf("read = %+v, %v; want version 200", r, err)
	}
	if r2.Forwarded() == 0 || r2.Forwarded() == 201 {
		t.Fatalf("second router forwarded %d of 201 requests; the queue group should split them", r2.Forwarded())
	}
}
