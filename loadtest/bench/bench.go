// Package bench is Kuma's load test, run as `go run ./loadtest` or `kuma
// bench`: W concurrent writers append batches of B events (~200-byte JSON
// each) to random entities until N events are acknowledged, then it prints
// events/s and the latency of one append (one batch), acknowledged only once
// durable, the resources the node used, and how long the event stream and
// the projections took to catch up.
//
//	kuma bench                                    # embedded node in a temp dir
//	kuma bench --nats-url nats://127.0.0.1:4222   # a running `kuma up` (--metrics-url for its CPU and memory)
//	kuma bench --baseline sqlite                  # and raw SQLite, same workload (also sqlite-multirow, shard-writer)
//	kuma bench --rate 250 --events 200000         # latency at a fixed rate (appends/s)
package bench

import (
	"context"
	"encoding/json"
	"errors"
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
	natsURL, metricsURL, sync, ctxName, baseline    string
	followerMode                                    string
	progress, node, kumaBinary, cpuProfile          string
	heapProfile                                     string
	profileWindow                                   time.Duration
	progressTo                                      io.Writer
	direct, verify, jsonOut, feedCatchUp            bool
	followers, pgPool                               int
	pgDSN                                           string
	timeout                                         time.Duration
}

// Options are what the calling program knows.
type Options struct {
	// KumaBinary is the kuma executable, to start the node in a process of
	// its own (`--node process`); empty allows only an embedded node.
	KumaBinary string
}

// Main runs the load test with the command line args (without the program
// name) and returns the exit status: 0, 1 when the run failed or an
// acknowledged event is missing, 2 for bad flags.
func Main(ctx context.Context, name string, args []string, opts Options, stdout, stderr io.Writer) int {
	var c config
	c.kumaBinary = opts.KumaBinary
	defaultNode := "embedded"
	if opts.KumaBinary != "" {
		defaultNode = "process"
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&c.events, "events", 1_000_000, "events to append in all")
	fs.IntVar(&c.writers, "writers", 200, "concurrent writers")
	fs.IntVar(&c.batch, "batch", 100, "events per append")
	fs.IntVar(&c.entities, "entities", 10_000, "distinct entities written")
	fs.IntVar(&c.payloadBytes, "payload-bytes", 200, "approximate size of one event's JSON data")
	fs.Float64Var(&c.readRatio, "read-ratio", 0, "fraction of operations that are reads of a live entity (0 to 0.99)")
	fs.Float64Var(&c.rate, "rate", 0, "appends per second for a latency run (0: saturation); reads (--read-ratio) are paced too, on top of these")
	fs.IntVar(&c.shards, "shards", 16, "shards of the embedded node (and of --direct routing)")
	fs.IntVar(&c.conns, "conns", 4, "NATS connections shared by the writers")
	fs.StringVar(&c.natsURL, "nats-url", "", "a running Kuma's NATS; empty starts a node in a temp dir (see --node)")
	fs.StringVar(&c.node, "node", defaultNode, "without --nats-url: process (`kuma up` in a process of its own, measured apart) or embedded (in this process)")
	fs.StringVar(&c.metricsURL, "metrics-url", "", "with --nats-url: the node's metrics address (host:port), for its CPU and memory")
	fs.StringVar(&c.sync, "sync", "FULL", "embedded node: SQLite synchronous FULL or NORMAL")
	fs.StringVar(&c.ctxName, "context", "default", "Kuma context")
	fs.StringVar(&c.baseline, "baseline", "", "also run the same appends on baselines, comma-separated: sqlite (raw SQLite, one INSERT per row), sqlite-multirow, shard-writer (Kuma's own writer, no NATS), postgres (one COPY per append; needs --pg-dsn)")
	fs.StringVar(&c.pgDSN, "pg-dsn", "", "the PostgreSQL for --baseline postgres, e.g. postgres://kuma@127.0.0.1:5433/kuma?sslmode=disable")
	fs.IntVar(&c.pgPool, "pg-pool", 8, "connections of the postgres baseline's pool")
	fs.StringVar(&c.progress, "progress", "auto", "live progress bar on stderr: auto (on a terminal), on, off")
	fs.BoolVar(&c.direct, "direct", false, "route to shard subjects directly, skipping the router")
	fs.BoolVar(&c.verify, "verify", false, "afterwards, read every entity back and check every acknowledged event is there")
	fs.IntVar(&c.followers, "followers", 0, "live feed followers (kuma.<ctx>.feed from the end) during the run; prints their commit-to-delivery latency")
	fs.StringVar(&c.followerMode, "follower-mode", followDecode, "what --followers do with a page: decode (every event, for commit-to-delivery latency) or raw (count the events and take the cursor without decoding: little CPU in this process)")
	fs.BoolVar(&c.feedCatchUp, "feed-catchup", false, "afterwards, read the whole feed from the first event, check every entity's versions and time it")
	fs.BoolVar(&c.jsonOut, "json", false, "print the results as JSON instead of text")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile to FILE: of the node's process over --profile-window from the first append (--node process), or of this process over Kuma's run (embedded node, or --nats-url)")
	fs.DurationVar(&c.profileWindow, "profile-window", 10*time.Second, "with --cpuprofile and --node process: how long the node is profiled")
	fs.StringVar(&c.heapProfile, "heapprofile", "", "write a heap profile of the node to FILE once the stream and projections have caught up (with --nats-url, needs --metrics-url of a node run with --pprof)")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "per append")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	c.progressTo = progressWriter(c.progress, stderr)
	if names, err := parseBaselines(c.baseline); err == nil && c.pgDSN == "" {
		for _, n := range names {
			if n == BaselinePostgres {
				fmt.Fprintf(stderr, "%s: %s\n", name, pgHowTo)
				return 2
			}
		}
	}
	if c.followerMode != followDecode && c.followerMode != followRaw {
		fmt.Fprintf(stderr, "%s: --follower-mode must be decode or raw\n", name)
		return 2
	}
	if c.pgPool < 1 {
		fmt.Fprintf(stderr, "%s: --pg-pool must be 1 or more\n", name)
		return 2
	}
	if c.heapProfile != "" && c.natsURL != "" && c.metricsURL == "" {
		fmt.Fprintf(stderr, "%s: --heapprofile with --nats-url needs --metrics-url of a node run with --pprof\n", name)
		return 2
	}
	if c.profileWindow <= 0 {
		fmt.Fprintf(stderr, "%s: --profile-window must be positive\n", name)
		return 2
	}
	out := stdout
	if c.jsonOut {
		out = io.Discard
	}
	rep, err := runAll(ctx, c, out)
	if c.jsonOut && rep != nil {
		b, _ := json.MarshalIndent(rep, "", "  ")
		fmt.Fprintln(stdout, string(b))
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 1
	}
	return 0
}

// progressWriter is where the progress bar goes, or nil for none.
func progressWriter(mode string, stderr io.Writer) io.Writer {
	switch mode {
	case "on":
		return stderr
	case "off":
		return nil
	}
	if f, ok := stderr.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			return stderr
		}
	}
	return nil
}

// report is everything one invocation measured.
type report struct {
	Kuma      *result    `json:"kuma"`
	Baselines []baseline `json:"baselines,omitempty"`
}

type baseline struct {
	Name string `json:"name"`
	*result
	// Ratio is Kuma's events/s over the baseline's.
	Ratio float64 `json:"ratio"`
}

func runAll(ctx context.Context, c config, out io.Writer) (*report, error) {
	names, err := parseBaselines(c.baseline)
	if err != nil {
		return nil, err
	}
	// A node in a process of its own is profiled through its /debug/pprof
	// (run() does that); otherwise this process is the one to profile.
	inProcess := c.cpuProfile
	if c.nodeProcess() {
		inProcess = ""
	}
	stopProfile, err := startCPUProfile(inProcess)
	if err != nil {
		return nil, err
	}
	r, err := run(ctx, c, out)
	if perr := stopProfile(); perr != nil && err == nil {
		err = perr
	}
	rep := &report{Kuma: r}
	if err != nil {
		return rep, err
	}
	for _, name := range names {
		b, err := runBaseline(ctx, name, c, out)
		if err != nil {
			return rep, err
		}
		ratio := r.EventsSec / b.EventsSec
		rep.Baselines = append(rep.Baselines, baseline{Name: name, result: b, Ratio: ratio})
		fmt.Fprintf(out, "kuma / baseline %s: %.2f\n", name, ratio)
	}
	return rep, nil
}

var discardLog = slog.New(slog.DiscardHandler)
