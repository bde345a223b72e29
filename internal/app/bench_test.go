package app_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// benchPayload is a ~200-byte event, as in the seed's benchmark.
var benchPayload = json.RawMessage(`{"name":"Dwighson","role":"architect","email":"dwighson@example.com","team":"platform","level":7,"tags":["a","b","c"],"active":true,"note":"lorem ipsum dolor sit amet, consectetur"}`)

// BenchmarkAppendE2E is the seed's workload through the real path: 200
// concurrent writers, batches of 100 events for one of 10,000 entities, sent
// over TCP NATS to the router (or straight to the shard), acknowledged only
// once fsynced (synchronous=FULL). One op is one batch of 100 events.
func BenchmarkAppendE2E(b *testing.B) {
	for _, v := range []struct {
		name   string
		direct bool
		sample float64 // < 0: tracing off
	}{{"via-router", false, -1}, {"direct", true, -1}, {"via-router-traced-1pct", false, 0.01}} {
		direct := v.direct
		b.Run(v.name, func(b *testing.B) {
			var tp *sdktrace.TracerProvider
			if v.sample >= 0 {
				tp = sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(v.sample))),
					sdktrace.WithBatcher(discardExporter{}))
				defer tp.Shutdown(context.Background())
			}
			n := kumatest.Start(b, func(c *app.Config) {
				c.Shards = 16
				if tp != nil {
					c.TracerProvider = tp
				}
			})
			clients := make([]*client.Client, 4)
			for i := range clients {
				nc, err := nats.Connect(n.App.ClientURL())
				if err != nil {
					b.Fatal(err)
				}
				defer nc.Close()
				opts := client.Options{NoAutoIdempotencyKey: true}
				if tp != nil {
					opts.TracerProvider = tp
				}
				if direct {
					opts.DirectShards = 16
				}
				clients[i], _ = client.New(nc, opts)
			}
			batch := make([]kuma.EventInput, 100)
			for i := range batch {
				batch[i] = kuma.EventInput{Type: "UserUpdated", Data: benchPayload}
			}
			var worker atomic.Int64
			var latMu sync.Mutex
			var lats []time.Duration
			b.SetParallelism(100) // ×2 cores = 200 writers
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				w := worker.Add(1)
				c := clients[w%int64(len(clients))]
				rng := rand.New(rand.NewPCG(uint64(w), 1))
				var mine []time.Duration
				for pb.Next() {
					entity := fmt.Sprintf("user-%d", rng.IntN(10_000))
					start := time.Now()
					if _, err := c.Append(context.Background(), entity, batch); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(start))
				}
				latMu.Lock()
				lats = append(lats, mine...)
				latMu.Unlock()
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N*len(batch))/b.Elapsed().Seconds(), "events/s")
			reportPercentiles(b, lats)
		})
	}
}

// BenchmarkReadLive reads the current state of a live entity (its actor is
// in memory) through the router: the read path's latency.
func BenchmarkReadLive(b *testing.B) {
	n := kumatest.Start(b, nil)
	c := n.Client(client.Options{})
	if _, err := c.Append(context.Background(), "hot", []kuma.EventInput{{Type: "Set", Data: benchPayload}}); err != nil {
		b.Fatal(err)
	}
	lats := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		if _, err := c.Read(context.Background(), "hot"); err != nil {
			b.Fatal(err)
		}
		lats = append(lats, time.Since(start))
	}
	b.StopTimer()
	reportPercentiles(b, lats)
}

func reportPercentiles(b *testing.B, lats []time.Duration) {
	if len(lats) == 0 {
		return
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	at := func(p float64) float64 {
		return float64(lats[min(len(lats)-1, int(p*float64(len(lats))))].Microseconds()) / 1000
	}
	b.ReportMetric(at(0.50), "p50-ms")
	b.ReportMetric(at(0.99), "p99-ms")
}

// BenchmarkManyEntities touches b.N distinct entities (one small append
// each) with the default bound on live actors (100,000) and reports the live
// actors and the heap afterwards: memory stays bounded by MaxActors, not by
// the entity count.
func BenchmarkManyEntities(b *testing.B) {
	n := kumatest.Start(b, func(c *app.Config) { c.Shards = 16 })
	c := n.Client(client.Options{NoAutoIdempotencyKey: true, DirectShards: 16})
	ev := []kuma.EventInput{{Type: "Seen", Data: benchPayload}}
	var next atomic.Int64
	b.SetParallelism(50)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Append(context.Background(), fmt.Sprintf("dev-%d", next.Add(1)), ev); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	// Reads of entities whose actors were passivated long ago (the first
	// tenth written, with MaxActors far below b.N): each brings its actor
	// back from the shard file, its key from the keyvault or the cache.
	if total := next.Load(); total > 2*100_000 {
		rng := rand.New(rand.NewPCG(1, 2))
		lats := make([]time.Duration, 0, 2000)
		for range cap(lats) {
			id := fmt.Sprintf("dev-%d", 1+rng.Int64N(total/10))
			start := time.Now()
			if _, err := c.Read(context.Background(), id); err != nil {
				b.Fatal(err)
			}
			lats = append(lats, time.Since(start))
		}
		sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
		b.ReportMetric(float64(lats[len(lats)/2].Microseconds())/1000, "passivated-read-p50-ms")
		b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds())/1000, "passivated-read-p99-ms")
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	b.ReportMetric(float64(liveActors(n)), "live-actors")
	b.ReportMetric(float64(ms.HeapInuse)/(1<<20), "heap-MiB")
	b.ReportMetric(float64(ms.StackInuse)/(1<<20), "stacks-MiB")
	b.ReportMetric(float64(runtime.NumGoroutine()), "goroutines")
	if rss := residentMiB(); rss > 0 {
		b.ReportMetric(rss, "rss-MiB")
	}
}

// residentMiB reads the process's resident set from /proc (Linux), or 0.
func residentMiB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// discardExporter drops spans: the benchmark measures the cost of tracing
// in the process, not of a collector.
type discardExporter struct{}

func (discardExporter) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discardExporter) Shutdown(context.Context) error                             { return nil }
