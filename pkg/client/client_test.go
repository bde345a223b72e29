package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

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
