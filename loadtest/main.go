// Command loadtest runs the seed's benchmark against Kuma: W concurrent
// writers append batches of B events (~200-byte JSON each) to random entities
// until N events are acknowledged, then prints events/s and the latency of
// one append (one batch), acknowledged only once durable.
//
//	go run ./loadtest                               # embedded node in a temp dir
//	go run ./loadtest --nats-url nats://127.0.0.1:4222   # a running `kuma up`
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

type config struct {
	events, writers, batch, entities, shards, conns int
	natsURL, sync, ctxName                          string
	direct                                          bool
	timeout                                         time.Duration
}

// result is what one run measured.
type result struct {
	Events    int64
	Appends   int64
	Errors    int64
	Elapsed   time.Duration
	P50, P90  time.Duration
	P99, Max  time.Duration
	EventsSec float64
	// StreamCatchUp is how long after the last acknowledgement the event
	// stream held every event (relay lag 0 in status).
	StreamCatchUp time.Duration
}

func main() {
	var c config
	fs := flag.NewFlagSet("loadtest", flag.ExitOnError)
	fs.IntVar(&c.events, "events", 1_000_000, "events to append in all")
	fs.IntVar(&c.writers, "writers", 200, "concurrent writers")
	fs.IntVar(&c.batch, "batch", 100, "events per append")
	fs.IntVar(&c.entities, "entities", 10_000, "distinct entities written")
	fs.IntVar(&c.shards, "shards", 16, "shards of the embedded node (and of --direct routing)")
	fs.IntVar(&c.conns, "conns", 4, "NATS connections shared by the writers")
	fs.StringVar(&c.natsURL, "nats-url", "", "a running Kuma's NATS; empty starts an embedded node in a temp dir")
	fs.StringVar(&c.sync, "sync", "FULL", "embedded node: SQLite synchronous FULL or NORMAL")
	fs.StringVar(&c.ctxName, "context", "default", "Kuma context")
	fs.BoolVar(&c.direct, "direct", false, "route to shard subjects directly, skipping the router")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "per append")
	_ = fs.Parse(os.Args[1:])
	if _, err := run(context.Background(), c, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config, out io.Writer) (*result, error) {
	if c.events < c.batch || c.batch < 1 || c.writers < 1 || c.entities < 1 || c.conns < 1 {
		return nil, fmt.Errorf("need events >= batch >= 1 and writers, entities, conns >= 1")
	}
	url := c.natsURL
	if url == "" {
		dir, err := os.MkdirTemp("", "kuma-loadtest-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		a, err := app.New(app.Config{DataDir: dir, Shards: c.shards, NATSListen: "127.0.0.1:-1",
			Synchronous: c.sync, Context: c.ctxName, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return nil, err
		}
		if err := a.Start(ctx); err != nil {
			return nil, err
		}
		defer a.Stop(context.Background())
		url = a.ClientURL()
		fmt.Fprintf(out, "embedded node: %d shards, synchronous=%s, data in %s\n", c.shards, c.sync, dir)
	}
	clients := make([]*client.Client, c.conns)
	var statusConn *nats.Conn
	for i := range clients {
		nc, err := nats.Connect(url)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", url, err)
		}
		defer nc.Close()
		statusConn = nc
		opts := client.Options{Context: c.ctxName, Timeout: c.timeout}
		if c.direct {
			opts.DirectShards = c.shards
		}
		if clients[i], err = client.New(nc, opts); err != nil {
			return nil, err
		}
	}
	payload := json.RawMessage(`{"name":"Dwighson","role":"architect","email":"dwighson@example.com","team":"platform","level":7,"tags":["a","b","c"],"active":true,"note":"lorem ipsum dolor sit amet, consectetur"}`)
	batch := make([]kuma.EventInput, c.batch)
	for i := range batch {
		batch[i] = kuma.EventInput{Type: "UserUpdated", Data: payload}
	}

	appends := int64(c.events / c.batch)
	var next, failed atomic.Int64
	lats := make([][]time.Duration, c.writers)
	var wg sync.WaitGroup
	fmt.Fprintf(out, "appending %d events: %d writers, batches of %d, %d entities, via %s\n",
		appends*int64(c.batch), c.writers, c.batch, c.entities, map[bool]string{true: "shard subjects", false: "router"}[c.direct])
	start := time.Now()
	for w := 0; w < c.writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			cl := clients[w%len(clients)]
			rng := rand.New(rand.NewPCG(uint64(w), uint64(start.UnixNano())))
			for next.Add(1) <= appends {
				entity := fmt.Sprintf("user-%d", rng.IntN(c.entities))
				t0 := time.Now()
				if _, err := cl.Append(ctx, entity, batch); err != nil {
					if failed.Add(1) <= 5 {
						fmt.Fprintf(out, "append failed: %v\n", err)
					}
					continue
				}
				lats[w] = append(lats[w], time.Since(t0))
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start)

	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	r := &result{Appends: int64(len(all)), Events: int64(len(all)) * int64(c.batch), Errors: failed.Load(), Elapsed: elapsed}
	if len(all) > 0 {
		pct := func(p float64) time.Duration { return all[min(len(all)-1, int(p*float64(len(all))))] }
		r.P50, r.P90, r.P99, r.Max = pct(0.50), pct(0.90), pct(0.99), all[len(all)-1]
	}
	r.EventsSec = float64(r.Events) / elapsed.Seconds()
	fmt.Fprintf(out, "acknowledged %d events in %d appends (%d failed) in %s\n", r.Events, r.Appends, r.Errors, elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "throughput: %.0f events/s\n", r.EventsSec)
	fmt.Fprintf(out, "append latency: p50 %s  p90 %s  p99 %s  max %s\n", r.P50.Round(time.Microsecond), r.P90.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Max.Round(time.Microsecond))
	catchUp, err := waitForStream(ctx, statusConn, c.ctxName)
	if err != nil {
		return r, err
	}
	r.StreamCatchUp = catchUp
	fmt.Fprintf(out, "event stream caught up %s after the last acknowledgement\n", catchUp.Round(time.Millisecond))
	if r.Errors > 0 {
		return r, fmt.Errorf("%d appends failed", r.Errors)
	}
	return r, nil
}

// waitForStream polls kuma.<ctx>.status until no shard has relay lag.
func waitForStream(ctx context.Context, nc *nats.Conn, kctx string) (time.Duration, error) {
	start := time.Now()
	for time.Since(start) < time.Minute {
		msg, err := nc.Request("kuma."+kctx+".status", nil, 5*time.Second)
		if err != nil {
			return 0, fmt.Errorf("status: %w", err)
		}
		var st kuma.StatusReply
		if err := json.Unmarshal(msg.Data, &st); err != nil {
			return 0, fmt.Errorf("status: %w", err)
		}
		var lag int64
		for _, s := range st.Shards {
			lag += s.RelayLag
		}
		if lag == 0 {
			return time.Since(start), nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, fmt.Errorf("the event stream did not catch up within a minute")
}
