// Command loadtest runs the seed's benchmark against Kuma: W concurrent
// writers append batches of B events (~200-byte JSON each) to random entities
// until N events are acknowledged, then prints events/s and the latency of
// one append (one batch), acknowledged only once durable.
//
//	go run ./loadtest                                    # embedded node in a temp dir
//	go run ./loadtest --nats-url nats://127.0.0.1:4222   # a running `kuma up`
//	go run ./loadtest --baseline sqlite                  # and the raw shard writer, same workload
//	go run ./loadtest --rate 250 --events 200000         # latency at a fixed rate (appends/s)
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"
)

type config struct {
	events, writers, batch, entities, shards, conns int
	payloadBytes                                    int
	readRatio                                       float64
	rate                                            float64 // appends per second; 0: as fast as possible
	natsURL, sync, ctxName, baseline                string
	direct, verify, jsonOut                         bool
	timeout                                         time.Duration
}

func main() {
	var c config
	fs := flag.NewFlagSet("loadtest", flag.ExitOnError)
	fs.IntVar(&c.events, "events", 1_000_000, "events to append in all")
	fs.IntVar(&c.writers, "writers", 200, "concurrent writers")
	fs.IntVar(&c.batch, "batch", 100, "events per append")
	fs.IntVar(&c.entities, "entities", 10_000, "distinct entities written")
	fs.IntVar(&c.payloadBytes, "payload-bytes", 200, "approximate size of one event's JSON data")
	fs.Float64Var(&c.readRatio, "read-ratio", 0, "fraction of operations that are reads of a live entity (0 to 0.99)")
	fs.Float64Var(&c.rate, "rate", 0, "appends per second for a latency run (0: saturation)")
	fs.IntVar(&c.shards, "shards", 16, "shards of the embedded node (and of --direct routing)")
	fs.IntVar(&c.conns, "conns", 4, "NATS connections shared by the writers")
	fs.StringVar(&c.natsURL, "nats-url", "", "a running Kuma's NATS; empty starts an embedded node in a temp dir")
	fs.StringVar(&c.sync, "sync", "FULL", "embedded node: SQLite synchronous FULL or NORMAL")
	fs.StringVar(&c.ctxName, "context", "default", "Kuma context")
	fs.StringVar(&c.baseline, "baseline", "", "also run the same workload on a baseline: sqlite (Kuma's raw shard writer, no NATS)")
	fs.BoolVar(&c.direct, "direct", false, "route to shard subjects directly, skipping the router")
	fs.BoolVar(&c.verify, "verify", false, "afterwards, read every entity back and check every acknowledged event is there")
	fs.BoolVar(&c.jsonOut, "json", false, "print the results as JSON instead of text")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "per append")
	_ = fs.Parse(os.Args[1:])
	out := io.Writer(os.Stdout)
	if c.jsonOut {
		out = io.Discard
	}
	rep, err := runAll(context.Background(), c, out)
	if c.jsonOut && rep != nil {
		b, _ := json.MarshalIndent(rep, "", "  ")
		fmt.Println(string(b))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

// report is everything one invocation measured.
type report struct {
	Kuma     *result `json:"kuma"`
	Baseline *result `json:"baseline,omitempty"`
	// Ratio is Kuma's events/s over the baseline's.
	Ratio float64 `json:"ratio,omitempty"`
}

func runAll(ctx context.Context, c config, out io.Writer) (*report, error) {
	r, err := run(ctx, c, out)
	rep := &report{Kuma: r}
	if err != nil || c.baseline == "" {
		return rep, err
	}
	if c.baseline != "sqlite" {
		return rep, fmt.Errorf("unknown baseline %q (want sqlite)", c.baseline)
	}
	b, err := runSQLiteBaseline(ctx, c, out)
	rep.Baseline = b
	if err == nil && b.EventsSec > 0 {
		rep.Ratio = r.EventsSec / b.EventsSec
		fmt.Fprintf(out, "kuma / baseline: %.2f\n", rep.Ratio)
	}
	return rep, err
}

var discardLog = slog.New(slog.DiscardHandler)
