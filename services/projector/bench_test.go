package projector_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go"
)

// BenchmarkStreamAndProjections writes KUMA_BENCH_EVENTS events (default
// 200,000; the figure is 1,000,000) the seed's way (200 writers,
// batches of 100, 10,000 entities, ~200-byte events) and measures, from the
// first write:
//   - write: events/s acknowledged by appends;
//   - relay: events/s until the stream holds every event;
//   - apply: events/s until the entities projection and a declared counting
//     projection have applied every event (they run while the writes do);
//   - rebuild: events/s of rebuilding each from the first event (one at a
//     time), until the new copy is swapped in.
//
// Run it once: go test ./services/projector -run '^$' -bench StreamAndProjections -benchtime 1x
func BenchmarkStreamAndProjections(b *testing.B) {
	total := 200_000
	if v, err := strconv.Atoi(os.Getenv("KUMA_BENCH_EVENTS")); err == nil && v > 0 {
		total = v
	}
	for b.Loop() {
		benchOnce(b, total)
	}
}

var benchData = json.RawMessage(`{"name":"Dwighson","role":"architect","email":"dwighson@example.com","team":"platform","level":7,"tags":["a","b","c"],"active":true,"note":"lorem ipsum dolor sit amet, consectetur"}`)

func benchOnce(b *testing.B, total int) {
	n := kumatest.Start(b, func(c *app.Config) {
		c.Shards = 16
		c.Projections = []projection.Spec{{
			Name:    "counts",
			Tables:  []string{`CREATE TABLE totals (entity TEXT PRIMARY KEY, events INTEGER NOT NULL, level INTEGER NOT NULL)`},
			On:      map[string]string{"*": `INSERT INTO totals VALUES (:entity, 1, :level) ON CONFLICT (entity) DO UPDATE SET events = events + 1, level = level + excluded.level`},
			Queries: map[string]projection.Query{"totals": {SQL: `SELECT coalesce(sum(events), 0) AS events FROM totals`}},
		}}
	})
	batch := make([]kuma.EventInput, 100)
	for i := range batch {
		batch[i] = kuma.EventInput{Type: "UserUpdated", Data: benchData}
	}
	clients := make([]*client.Client, 4)
	for i := range clients {
		nc, err := nats.Connect(n.App.ClientURL())
		if err != nil {
			b.Fatal(err)
		}
		defer nc.Close()
		clients[i], _ = client.New(nc, client.Options{NoAutoIdempotencyKey: true, Timeout: time.Minute})
	}
	c := clients[0]
	ctx := context.Background()
	batches := total / len(batch)
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := clients[w%len(clients)]
			for {
				i := next.Add(1) - 1
				if i >= int64(batches) {
					return
				}
				if _, err := cl.Append(ctx, fmt.Sprintf("user-%d", i%10_000), batch); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	wrote := time.Since(start)
	events := int64(batches * len(batch))

	// Poll status for the relay and the projections.
	var relayed, applied time.Duration
	var st *kuma.StatusReply
	for relayed == 0 || applied == 0 {
		var err error
		if st, err = c.Status(ctx); err != nil {
			b.Fatal(err)
		}
		var lag, published int64
		for _, s := range st.Shards {
			lag += s.RelayLag
			published += s.Events - s.RelayLag
		}
		if relayed == 0 && lag == 0 && published == events {
			relayed = time.Since(start)
		}
		if applied == 0 && relayed > 0 && allApplied(st, 1) {
			applied = time.Since(start)
		}
		if time.Since(start) > 30*time.Minute {
			b.Fatal("not caught up in 30 minutes")
		}
		time.Sleep(5 * time.Millisecond)
	}
	q, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"})
	if err != nil || q.Rows[0]["events"] != float64(events) {
		b.Fatalf("counts: %v, %v; want %d events", q, err, events)
	}

	// One rebuild at a time, each from the first event.
	rebuilt := map[string]time.Duration{}
	for _, p := range []string{"entities", "counts"} {
		rstart := time.Now()
		if _, err := c.Rebuild(ctx, p); err != nil {
			b.Fatal(err)
		}
		for {
			st, err := c.Status(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if generationIs(st, p, 2) && allApplied(st, 0) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		rebuilt[p] = time.Since(rstart)
	}
	rate := func(d time.Duration) float64 { return float64(events) / d.Seconds() }
	b.ReportMetric(rate(wrote), "write-events/s")
	b.ReportMetric(rate(relayed), "relay-events/s")
	b.ReportMetric(rate(applied), "apply-events/s")
	b.ReportMetric(rate(rebuilt["entities"]), "rebuild-entities-events/s")
	b.ReportMetric(rate(rebuilt["counts"]), "rebuild-counts-events/s")
	b.Logf("%d events: written in %s, all in the stream after %s, applied by both projections after %s; rebuilt: entities in %s, counts in %s",
		events, wrote.Round(time.Millisecond), relayed.Round(time.Millisecond), applied.Round(time.Millisecond),
		rebuilt["entities"].Round(time.Millisecond), rebuilt["counts"].Round(time.Millisecond))
}

// generationIs tells whether projection name is live at generation gen.
func generationIs(st *kuma.StatusReply, name string, gen int64) bool {
	for _, p := range st.Projections {
		if p.Name == name {
			return p.Generation == gen && p.Rebuild == nil
		}
	}
	return false
}

// allApplied tells whether every projection (at generation gen, unless 0)
// runs no rebuild and has applied every shard's last position.
func allApplied(st *kuma.StatusReply, gen int64) bool {
	if len(st.Projections) < 2 {
		return false
	}
	for _, p := range st.Projections {
		if (gen != 0 && p.Generation != gen) || p.Rebuild != nil {
			return false
		}
		for _, s := range st.Shards {
			if s.Position != "" && p.Positions[strconv.Itoa(s.Shard)] != s.Position {
				return false
			}
		}
	}
	return true
}
