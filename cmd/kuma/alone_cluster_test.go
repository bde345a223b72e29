//go:build cluster

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestKeyvaultAndProjectorKilledAlone: a keyvault and a projector that run
// as services of their own (kuma serve --target keyvault|projector, as in
// the microservices deployment) die on their own, everything else alive,
// under a load of appends to new entities and queries. The other instances
// answer: new entities keep being accepted, every entities query with after
// is answered, and only a request in flight at the kill may need a retry
// (unavailable or timeout, never another error).
func TestKeyvaultAndProjectorKilledAlone(t *testing.T) {
	c, nc := startKeyed(t)
	natsURL := "nats://127.0.0.1:" + strconv.Itoa(c.node("n2").natsPort)
	service := func(target, name string) *proc {
		args := []string{"serve", "--target", target, "--node", name, "--data", filepath.Join(c.dir, name),
			"--shards", strconv.Itoa(clusterShards), "--nats-url", natsURL,
			"--metrics-listen", "127.0.0.1:" + strconv.Itoa(freePort(t)), "--log-format", "text"}
		if target == "keyvault" {
			args = append(args, "--master-key-file", c.masterKeyFile) // only the keyvault holds it
		}
		p := spawn(t, args, "KUMA_MASTER_KEY=")
		p.waitReady(t, 90*time.Second)
		return p
	}
	kv := service("keyvault", "kv4")
	px := service("projector", "px4")
	cl, err := client.New(nc, client.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}

	// The prober: a new entity, then a query with after for it, over and
	// over; each retried (same idempotency key) until it goes through.
	failed := newFailures()
	done := 0
	probe := func(until time.Time) {
		for time.Now().Before(until) {
			e := fmt.Sprintf("alone-%d", done)
			var pos string
			for start := time.Now(); pos == ""; {
				if time.Since(start) > time.Minute {
					t.Fatalf("append to new entity %s not accepted within a minute; failures %v", e, failed)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				r, err := cl.Append(ctx, e, []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"n":1}`)}}, client.IdempotencyKey(e))
				cancel()
				if err != nil {
					retryable(t, "a service", "append", err, failed)
					continue
				}
				pos = r.Position
			}
			for start := time.Now(); ; {
				if time.Since(start) > time.Minute {
					t.Fatalf("query with after %s for %s not answered within a minute; failures %v", pos, e, failed)
				}
				wait := 5000
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				q, err := cl.Query(ctx, "entities", &kuma.QueryRequest{After: pos, WaitMS: &wait,
					Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"` + e + `"`)}})
				cancel()
				if err == nil && len(q.Rows) == 1 {
					break
				}
				if err == nil {
					t.Fatalf("query after %s: %d rows for %s, want 1", pos, len(q.Rows), e)
				}
				retryable(t, "a service", "query", err, failed)
			}
			done++
		}
	}
	probe(time.Now().Add(5 * time.Second))
	before := done

	for _, victim := range []struct {
		name string
		p    *proc
	}{{"keyvault kv4", kv}, {"projector px4", px}} {
		if err := victim.p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = victim.p.cmd.Wait()
		from := done
		probe(time.Now().Add(15 * time.Second))
		t.Logf("kill -9 of %s alone: %d new entities accepted and projected in the 15 s after it", victim.name, done-from)
		if done == from {
			t.Fatalf("nothing went through in the 15 s after the kill of %s; failures %v", victim.name, failed)
		}
	}
	t.Logf("%d probes before the kills, %d in all; failed attempts (retried) %v", before, done, failed.n)

	// Every probe's entity is there, through the nodes.
	for i := range done {
		if _, err := cl.Read(t.Context(), fmt.Sprintf("alone-%d", i)); err != nil {
			t.Errorf("read alone-%d: %v", i, err)
		}
	}
}
