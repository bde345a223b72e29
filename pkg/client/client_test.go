package client_test

import (
	"context"
	"encoding/json"
	"errors"
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

// TestGivesUpAtDeadlineWithUnavailable: with nobody serving, the call ends at
// the context deadline with a retryable unavailable error.
func TestGivesUpAtDeadlineWithUnavailable(t *testing.T) {
	_, nc := kumatest.NATS(t)
	c, _ := client.New(nc, client.Options{})
	var err error
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err = c.Read(ctx, "nobody-serves")
	if !errors.Is(err, kuma.ErrUnavailable) {
		t.Fatalf("read with no server = %v, want unavailable", err)
	}
}

func TestTypedErrorsAndValidation(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ctx := t.Context()
	if _, err := c.Append(ctx, "bad id", []kuma.EventInput{{Type: "E"}}); !errors.Is(err, kuma.ErrInvalidEntityID) {
		t.Fatalf("bad id = %v, want invalid_entity_id", err)
	}
	if _, err := c.Read(ctx, "never"); !errors.Is(err, kuma.ErrNotFound) {
		t.Fatalf("read never written = %v, want not_found", err)
	}
	if _, err := c.Append(ctx, "acct", []kuma.EventInput{{Type: "Opened", Data: json.RawMessage(`{"b":1}`)}}); err != nil {
		t.Fatal(err)
	}
	_, err := c.Append(ctx, "acct", []kuma.EventInput{{Type: "E"}}, client.ExpectVersion(0))
	var kerr *kuma.Error
	if !errors.As(err, &kerr) || kerr.Code != kuma.CodeVersionConflict {
		t.Fatalf("conflict = %v", err)
	}
	if v, ok := kerr.ActualVersion(); !ok || v != 1 {
		t.Fatalf("ActualVersion = %d, %v; want 1", v, ok)
	}
	if _, err := c.Append(ctx, "acct", []kuma.EventInput{{Type: "9"}}); !errors.Is(err, kuma.ErrInvalidEvent) {
		t.Fatalf("bad type = %v, want invalid_event", err)
	}
	// Another context is its own namespace; this node serves only default,
	// and its router leaves other contexts to their own deployments: with
	// none, nobody answers, which the client retries until its deadline.
	other, _ := client.New(n.NC, client.Options{Context: "payments", Timeout: 200 * time.Millisecond})
	if _, err := other.Read(ctx, "acct"); !errors.Is(err, kuma.ErrUnavailable) {
		t.Fatalf("unknown context = %v, want unavailable (no responders)", err)
	}
	// Direct routing with the wrong shard count is refused, not misplaced.
	wrong, _ := client.New(n.NC, client.Options{DirectShards: 3})
	if _, err := wrong.Append(ctx, "acct", []kuma.EventInput{{Type: "E"}}); err == nil {
		r, _ := c.Read(ctx, "acct")
		if r.Version != 1 {
			t.Fatalf("a misrouted append changed the entity: %+v", r)
		}
	} else if !errors.Is(err, kuma.ErrBadRequest) {
		t.Fatalf("misrouted append = %v, want bad_request", err)
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
