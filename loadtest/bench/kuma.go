package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/services/shardnode"
	"github.com/nats-io/nats.go"
)

// result is what one run measured.
type result struct {
	Target  string `json:"target"`
	Events  int64  `json:"events"`
	Appends int64  `json:"appends"`
	Reads   int64  `json:"reads"`
	Errors  int64  `json:"errors"`
	// ReadErrors counts failed reads (not found is not a failure); their
	// codes are in ErrorsBy as "read: <code>".
	ReadErrors int64            `json:"read_errors,omitempty"`
	ErrorsBy   map[string]int64 `json:"errors_by_code,omitempty"`
	Elapsed    time.Duration    `json:"elapsed_ns"`
	EventsSec  float64          `json:"events_per_sec"`
	Append     percentiles      `json:"append_latency"`
	Read       percentiles      `json:"read_latency,omitempty"`
	// StreamCatchUp is how long after the last acknowledgement the event
	// stream held every event (relay lag 0 in status).
	StreamCatchUp time.Duration `json:"stream_catch_up_ns,omitempty"`
	// ProjectionsCatchUp is how long after the last acknowledgement every
	// projection had applied every shard's last position.
	ProjectionsCatchUp time.Duration `json:"projections_catch_up_ns,omitempty"`
	// Node is the CPU and memory the node used during the run.
	Node *usage `json:"node,omitempty"`
	// AppendsCPU is the cores used while the appends ran, by the node and
	// by this process (the writers and any followers).
	AppendsCPU *appendsCPU `json:"appends_cpu,omitempty"`
	Verified   bool        `json:"verified,omitempty"`
	// Follow is what the --followers saw; FeedCatchUp the --feed-catchup read.
	Follow      *FollowResult `json:"followers,omitempty"`
	FeedCatchUp *FeedCatchUp  `json:"feed_catch_up,omitempty"`
}

// appendsCPU is cores (CPU seconds over wall seconds) while the appends
// ran. The node's figure is 0 when it is embedded: then Generator holds it.
type appendsCPU struct {
	Node      float64 `json:"node_cores,omitempty"`
	Generator float64 `json:"generator_cores"`
}

func (a *appendsCPU) String() string {
	if a.Node == 0 {
		return fmt.Sprintf("this process %.2f cores (the node's work included when embedded)", a.Generator)
	}
	return fmt.Sprintf("node %.2f cores, load generator %.2f cores", a.Node, a.Generator)
}

// percentiles are exact: every latency is kept and sorted (an append is a
// batch, so a million events are ten thousand samples).
type percentiles struct {
	P50, P90, P99, P999, Max time.Duration
}

func percentilesOf(lats []time.Duration) percentiles {
	if len(lats) == 0 {
		return percentiles{}
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	at := func(p float64) time.Duration { return lats[min(len(lats)-1, int(p*float64(len(lats))))] }
	return percentiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), P999: at(0.999), Max: lats[len(lats)-1]}
}

func (p percentiles) String() string {
	r := func(d time.Duration) time.Duration { return d.Round(time.Microsecond) }
	return fmt.Sprintf("p50 %s  p90 %s  p99 %s  p99.9 %s  max %s", r(p.P50), r(p.P90), r(p.P99), r(p.P999), r(p.Max))
}

// payload makes one event's data of about n bytes.
func payload(n int) json.RawMessage {
	base := `{"name":"Dwighson","role":"architect","email":"dwighson@example.com","level":7,"note":""}`
	pad := max(0, n-len(base))
	return json.RawMessage(strings.Replace(base, `"note":""`, `"note":"`+strings.Repeat("x", pad)+`"`, 1))
}

func validate(c config) error {
	if c.events < c.batch || c.batch < 1 || c.writers < 1 || c.entities < 1 || c.conns < 1 || c.shards < 1 {
		return fmt.Errorf("need events >= batch >= 1 and writers, entities, conns, shards >= 1")
	}
	if c.readRatio < 0 || c.readRatio >= 1 {
		return fmt.Errorf("--read-ratio must be in [0, 1)")
	}
	return nil
}

func run(ctx context.Context, c config, out io.Writer) (*result, error) {
	if err := validate(c); err != nil {
		return nil, err
	}
	url := c.natsURL
	process := c.nodeProcess()
	if process {
		n, err := startNode(ctx, c, out)
		if err != nil {
			return nil, err
		}
		defer n.stop()
		url, c.natsURL, c.metricsURL = n.natsURL, n.natsURL, n.metricsAddr
	}
	if url == "" {
		if c.node != "embedded" && c.node != "" {
			return nil, fmt.Errorf("--node %q: want process or embedded", c.node)
		}
		dir, err := os.MkdirTemp("", "kuma-loadtest-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		a, err := app.New(app.Config{DataDir: dir, Shards: c.shards, NATS: natsbus.ServerConfig{Listen: "127.0.0.1:-1"},
			Shardnode: shardnode.Config{Synchronous: c.sync}, Context: c.ctxName, Logger: discardLog})
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
	for i := range clients {
		nc, err := nats.Connect(url)
		if err != nil {
			return nil, fmt.Errorf("connect %s: %w", url, err)
		}
		defer nc.Close()
		opts := client.Options{Context: c.ctxName, Timeout: c.timeout}
		if c.direct {
			opts.DirectShards = c.shards
		}
		if clients[i], err = client.New(nc, opts); err != nil {
			return nil, err
		}
	}
	batch := make([]kuma.EventInput, c.batch)
	data := payload(c.payloadBytes)
	for i := range batch {
		batch[i] = kuma.EventInput{Type: "UserUpdated", Data: data}
	}

	appends := int64(c.events / c.batch)
	var next, failed, reads, readsFailed atomic.Int64
	var errMu sync.Mutex
	errorsBy := map[string]int64{}
	countError := func(prefix string, err error) {
		errMu.Lock()
		errorsBy[prefix+string(kuma.ErrorCode(err))]++
		errMu.Unlock()
	}
	acked := make([]atomic.Int64, c.entities) // events acknowledged per entity
	appendLats := make([][]time.Duration, c.writers)
	readLats := make([][]time.Duration, c.writers)

	// A latency run paces every operation: each writer takes a slot, and
	// latency counts from when the slot was due, so a stall is not hidden
	// (coordinated omission). Slots come at rate/(1-readRatio) a second, so
	// appends keep the asked rate and reads come on top in the asked mix;
	// unpaced reads would arrive in bursts of up to one per writer.
	var slots chan time.Time
	stopPacer := make(chan struct{})
	if c.rate > 0 {
		slots = make(chan time.Time, c.writers)
		go func() {
			interval := time.Duration(float64(time.Second) * (1 - c.readRatio) / c.rate)
			due := time.Now()
			for {
				due = due.Add(interval)
				time.Sleep(time.Until(due))
				select {
				case slots <- due:
				case <-stopPacer:
					return
				}
			}
		}()
	}
	how := "saturation"
	if c.rate > 0 {
		how = fmt.Sprintf("%.0f appends/s", c.rate)
	}
	fmt.Fprintf(out, "appending %d events: %d writers, batches of %d, %d entities, ~%d-byte events, %s, via %s\n",
		appends*int64(c.batch), c.writers, c.batch, c.entities, len(data), how, map[bool]string{true: "shard subjects", false: "router"}[c.direct])
	var bar *progressBar
	if c.progressTo != nil {
		bar = newProgressBar(c.progressTo, appends*int64(c.batch))
	}
	before, meter := c.meter(url)
	selfBefore, _ := rusage()
	waitProfile := func() error { return nil }
	if process && c.cpuProfile != "" {
		waitProfile = profileNode(ctx, c.metricsURL, c.cpuProfile, c.profileWindow)
	}
	var follow *followers
	if c.followers > 0 {
		f, err := startFollowers(ctx, c.followers, c.followerMode, url, c.ctxName)
		if err != nil {
			return nil, fmt.Errorf("followers: %w", err)
		}
		follow = f
		fmt.Fprintf(out, "%d feed followers (%s) from the end of the feed\n", c.followers, c.followerMode)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < c.writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			cl := clients[w%len(clients)]
			rng := rand.New(rand.NewPCG(uint64(w), uint64(start.UnixNano())))
			// Reads go to entities this writer has written (live ones:
			// their actors are in memory), once it has written any.
			var mine []string
			for {
				t0 := time.Now()
				if slots != nil {
					t0 = <-slots
				}
				if c.readRatio > 0 && rng.Float64() < c.readRatio {
					id := fmt.Sprintf("user-%d", rng.IntN(c.entities))
					if len(mine) > 0 {
						id = mine[rng.IntN(len(mine))]
					}
					if _, err := cl.Read(ctx, id); err != nil && kuma.ErrorCode(err) != kuma.CodeNotFound {
						readsFailed.Add(1)
						countError("read: ", err)
						continue
					}
					readLats[w] = append(readLats[w], time.Since(t0))
					reads.Add(1)
					continue
				}
				if next.Add(1) > appends {
					return
				}
				e := rng.IntN(c.entities)
				id := fmt.Sprintf("user-%d", e)
				if _, err := cl.Append(ctx, id, batch); err != nil {
					failed.Add(1)
					countError("", err)
					continue
				}
				appendLats[w] = append(appendLats[w], time.Since(t0))
				acked[e].Add(int64(c.batch))
				if len(mine) < 256 {
					mine = append(mine, id)
				} else {
					mine[rng.IntN(len(mine))] = id
				}
				bar.add(int64(c.batch))
			}
		}(w)
	}
	wg.Wait()
	close(stopPacer)
	elapsed := time.Since(start)
	// Node usage below runs on through the catching up; this is the appends
	// alone, and this process's share, which followers here add to.
	cpu := &appendsCPU{}
	if self, err := rusage(); err == nil && selfBefore != nil {
		cpu.Generator = self.since(selfBefore).CPUCores
	}
	if c.natsURL != "" && before != nil {
		if at, err := meter(); err == nil {
			cpu.Node = at.since(before).CPUCores
		}
	}
	bar.done()

	var alls, allr []time.Duration
	for w := range appendLats {
		alls = append(alls, appendLats[w]...)
		allr = append(allr, readLats[w]...)
	}
	r := &result{Target: "kuma " + url, Appends: int64(len(alls)), Events: int64(len(alls)) * int64(c.batch), Reads: reads.Load(),
		Errors: failed.Load(), ReadErrors: readsFailed.Load(), ErrorsBy: errorsBy, Elapsed: elapsed,
		Append: percentilesOf(alls), Read: percentilesOf(allr)}
	r.EventsSec = float64(r.Events) / elapsed.Seconds()
	fmt.Fprintf(out, "acknowledged %d events in %d appends (%d failed %v) in %s\n", r.Events, r.Appends, r.Errors, errorsBy, elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "throughput: %.0f events/s\n", r.EventsSec)
	fmt.Fprintf(out, "append latency: %s\n", r.Append)
	r.AppendsCPU = cpu
	fmt.Fprintf(out, "CPU during the appends: %s\n", cpu)
	if r.Reads > 0 {
		fmt.Fprintf(out, "reads: %d (%d failed), latency: %s\n", r.Reads, r.ReadErrors, r.Read)
	}
	catchUp, _, err := waitForStatus(ctx, clients[0], time.Minute, streamCaughtUp)
	if err != nil {
		return r, fmt.Errorf("the event stream: %w", err)
	}
	r.StreamCatchUp = catchUp
	fmt.Fprintf(out, "event stream caught up %s after the last acknowledgement\n", catchUp.Round(time.Millisecond))
	if follow != nil {
		r.Follow = follow.stop(c.followers, c.followerMode, r.Events, time.Minute)
		fmt.Fprintf(out, "%s\n", r.Follow)
	}
	if pc, st, err := waitForStatus(ctx, clients[0], 5*time.Minute, projectionsCaughtUp); err != nil {
		fmt.Fprintf(out, "projections: %v\n", err)
	} else if len(st.Projections) > 0 {
		r.ProjectionsCatchUp = catchUp + pc
		fmt.Fprintf(out, "projections (%d) caught up %s after the last acknowledgement\n", len(st.Projections), r.ProjectionsCatchUp.Round(time.Millisecond))
	}
	if after, err := meter(); err == nil && before != nil {
		r.Node = after.since(before)
		fmt.Fprintf(out, "node: %s\n", r.Node)
	} else if err != nil {
		fmt.Fprintf(out, "node: CPU and memory not measured: %v\n", err)
	}
	if process && c.cpuProfile != "" {
		if err := waitProfile(); err != nil {
			return r, err
		}
		fmt.Fprintf(out, "CPU profile of the node over the %s from the first append: %s\n", c.profileWindow, c.cpuProfile)
	}
	if c.heapProfile != "" {
		addr := c.metricsURL // the node's, when it is another process
		if !process && c.natsURL == "" {
			addr = ""
		}
		if err := writeHeapProfile(ctx, addr, c.heapProfile); err != nil {
			return r, err
		}
		fmt.Fprintf(out, "heap profile of the node: %s\n", c.heapProfile)
	}
	if c.verify {
		if err := verify(ctx, clients[0], acked); err != nil {
			return r, err
		}
		r.Verified = true
		fmt.Fprintln(out, "verified: every acknowledged event is there")
	}
	if c.feedCatchUp {
		fc, err := feedCatchUp(ctx, url, c.ctxName, acked, out)
		r.FeedCatchUp = fc
		if err != nil {
			return r, err
		}
	}
	if r.Follow != nil && (r.Follow.Errors > 0 || r.Follow.Events < r.Events*int64(c.followers)) {
		return r, fmt.Errorf("feed followers: %d of %d events delivered, %d failed", r.Follow.Events, r.Events*int64(c.followers), r.Follow.Errors)
	}
	if r.Errors > 0 || r.ReadErrors > 0 {
		return r, fmt.Errorf("%d appends and %d reads failed", r.Errors, r.ReadErrors)
	}
	return r, nil
}

// verify reads every entity back: it must hold at least the events that
// were acknowledged for it (an append that timed out may have committed too),
// and its versions must be dense.
func verify(ctx context.Context, c *client.Client, acked []atomic.Int64) error {
	for e := range acked {
		want := acked[e].Load()
		if want == 0 {
			continue
		}
		id := fmt.Sprintf("user-%d", e)
		r, err := c.Read(ctx, id)
		if err != nil {
			return fmt.Errorf("verify %s: %w", id, err)
		}
		if r.Version < want {
			return fmt.Errorf("verify %s: %d events acknowledged, the entity holds %d", id, want, r.Version)
		}
		h, err := c.History(ctx, id, r.Version, 1)
		if err != nil || len(h.Events) != 1 || h.Events[0].Version != r.Version {
			return fmt.Errorf("verify %s: the last version %d is not readable (%v)", id, r.Version, err)
		}
	}
	return nil
}

// waitForStatus polls kuma.<ctx>.status until done says so, for at most
// limit; it returns how long that took and the last status.
func waitForStatus(ctx context.Context, c *client.Client, limit time.Duration, done func(*kuma.StatusReply) bool) (time.Duration, *kuma.StatusReply, error) {
	start := time.Now()
	for time.Since(start) < limit {
		st, err := c.Status(ctx)
		if err != nil {
			return 0, nil, fmt.Errorf("status: %w", err)
		}
		if done(st) {
			return time.Since(start), st, nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, nil, fmt.Errorf("not caught up within %s", limit)
}

// streamCaughtUp: no shard has relay lag.
func streamCaughtUp(st *kuma.StatusReply) bool {
	for _, s := range st.Shards {
		if s.RelayLag != 0 {
			return false
		}
	}
	return true
}

// projectionsCaughtUp: every projection has applied every shard's last
// position.
func projectionsCaughtUp(st *kuma.StatusReply) bool {
	for _, p := range st.Projections {
		for _, sh := range st.Shards {
			if sh.Position != "" && p.Positions[strconv.Itoa(sh.Shard)] != sh.Position {
				return false
			}
		}
	}
	return true
}
