package console

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	dto "github.com/prometheus/client_model/go"
)

// Sample is one look at the cluster, taken every PollInterval: the context's
// status (kuma.<ctx>.status) with the figures the monitor shows derived
// from it, plus this process's memory and commit latency.
type Sample struct {
	Time    time.Time `json:"time"`
	Context string    `json:"context"`
	// EventsTotal is the sum of the shards' committed events; EventsPerSec
	// its rise per second since the previous sample (shards missing from
	// either sample, as while one moves, are left out).
	EventsTotal  int64   `json:"events_total"`
	EventsPerSec float64 `json:"events_per_sec"`
	Entities     int64   `json:"entities"`
	ShardsOnline int     `json:"shards_online"`
	ShardsTotal  int     `json:"shards_total"`
	RelayLag     int64   `json:"relay_lag"`
	LiveActors   int     `json:"live_actors"`
	// Nodes, Shards and Projections are the status as Kuma answered it.
	Nodes       []kuma.NodeStatus       `json:"nodes"`
	Shards      []kuma.ShardStatus      `json:"shards"`
	Projections []kuma.ProjectionStatus `json:"projections"`
	Memory      Memory                  `json:"memory"`
	// CommitLatency is absent when no shardnode runs in this process.
	CommitLatency *Latency `json:"commit_latency,omitempty"`
	// Error says why the status could not be read; the figures are then
	// zero.
	Error *kuma.Error `json:"error,omitempty"`
}

// Memory is the console's own process, from runtime.MemStats.
type Memory struct {
	Node       string `json:"node,omitempty"`
	HeapAlloc  uint64 `json:"heap_alloc"` // bytes of live and not yet collected heap objects
	HeapSys    uint64 `json:"heap_sys"`
	Sys        uint64 `json:"sys"` // bytes obtained from the OS
	NumGC      uint32 `json:"num_gc"`
	Goroutines int    `json:"goroutines"`
}

// Latency holds percentiles of the group commit's duration, in
// milliseconds, estimated from the kuma_commit_duration_seconds histogram
// buckets over the last Window seconds (as Prometheus' histogram_quantile
// does). Commits is how many commits the window holds; with none the
// percentiles are zero.
type Latency struct {
	P50     float64 `json:"p50_ms"`
	P95     float64 `json:"p95_ms"`
	P99     float64 `json:"p99_ms"`
	Commits uint64  `json:"commits"`
	Window  float64 `json:"window_seconds"`
}

const (
	historySamples = 120 // two minutes of chart at one sample a second
	latencyWindow  = 10  // samples
	commitMetric   = "kuma_commit_duration_seconds"
)

// histSnap is the commit histogram at one time.
type histSnap struct {
	t      time.Time
	count  uint64
	bounds []float64
	cum    []uint64
}

// monitor polls the status, keeps the last samples and fans them out to the
// event streams. Its methods are safe for concurrent use.
type monitor struct {
	cfg Config
	c   *client.Client

	mu      sync.Mutex
	history []Sample
	prev    map[int]int64 // events per shard in the last good sample
	prevT   time.Time
	hist    []histSnap
	subs    map[chan Sample]struct{}
	stopped bool
}

func newMonitor(cfg Config, c *client.Client) *monitor {
	return &monitor{cfg: cfg, c: c, subs: map[chan Sample]struct{}{}}
}

// run polls until ctx ends, then closes every subscriber's channel so that
// the event streams end and the HTTP server can shut down.
func (m *monitor) run(ctx context.Context) {
	defer func() {
		m.mu.Lock()
		m.stopped = true
		for ch := range m.subs {
			close(ch)
		}
		m.subs = nil
		m.mu.Unlock()
	}()
	t := time.NewTicker(m.cfg.PollInterval)
	defer t.Stop()
	for {
		m.record(m.take(ctx))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// take reads the status and this process's figures; it does not touch the
// monitor's state.
func (m *monitor) take(ctx context.Context) Sample {
	ctx, cancel := context.WithTimeout(ctx, max(m.cfg.PollInterval, 2*time.Second))
	defer cancel()
	smp := Sample{Time: m.cfg.Now().UTC(), Context: m.cfg.Context, ShardsTotal: m.cfg.Shards,
		Nodes: []kuma.NodeStatus{}, Shards: []kuma.ShardStatus{}, Projections: []kuma.ProjectionStatus{}}
	st, err := m.c.Status(ctx)
	if err != nil {
		smp.Error = kuma.AsError(err)
	} else {
		smp.Nodes, smp.Shards, smp.Projections = st.Nodes, st.Shards, st.Projections
		for _, sh := range st.Shards {
			smp.EventsTotal += sh.Events
			smp.Entities += sh.Entities
			smp.RelayLag += sh.RelayLag
			smp.LiveActors += sh.LiveActors
		}
		smp.ShardsOnline = len(st.Shards)
		if smp.ShardsTotal == 0 {
			smp.ShardsTotal = smp.ShardsOnline
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	smp.Memory = Memory{Node: m.cfg.NodeName, HeapAlloc: ms.HeapAlloc, HeapSys: ms.HeapSys, Sys: ms.Sys,
		NumGC: ms.NumGC, Goroutines: runtime.NumGoroutine()}
	return smp
}

// record derives the rates from the previous sample, keeps smp and sends it
// to every stream. A stream too slow to take it misses this one.
func (m *monitor) record(smp Sample) {
	snap, haveHist := m.commitHistogram(smp.Time)
	m.mu.Lock()
	defer m.mu.Unlock()
	if smp.Error == nil {
		if m.prev != nil {
			if dt := smp.Time.Sub(m.prevT).Seconds(); dt > 0 {
				var rise int64
				for _, sh := range smp.Shards {
					if before, ok := m.prev[sh.Shard]; ok && sh.Events > before {
						rise += sh.Events - before
					}
				}
				smp.EventsPerSec = float64(rise) / dt
			}
		}
		m.prev = make(map[int]int64, len(smp.Shards))
		for _, sh := range smp.Shards {
			m.prev[sh.Shard] = sh.Events
		}
		m.prevT = smp.Time
	}
	if haveHist {
		m.hist = append(m.hist, snap)
		if len(m.hist) > latencyWindow+1 {
			m.hist = m.hist[len(m.hist)-latencyWindow-1:]
		}
		smp.CommitLatency = windowLatency(m.hist[0], snap)
	}
	m.history = append(m.history, smp)
	if len(m.history) > historySamples {
		m.history = m.history[len(m.history)-historySamples:]
	}
	for ch := range m.subs {
		select {
		case ch <- smp:
		default:
		}
	}
}

// commitHistogram reads the commit histogram from the Gatherer.
func (m *monitor) commitHistogram(t time.Time) (histSnap, bool) {
	if m.cfg.Gatherer == nil {
		return histSnap{}, false
	}
	mfs, err := m.cfg.Gatherer.Gather()
	if err != nil {
		return histSnap{}, false
	}
	for _, mf := range mfs {
		if mf.GetName() != commitMetric || mf.GetType() != dto.MetricType_HISTOGRAM || len(mf.Metric) == 0 {
			continue
		}
		h := mf.Metric[0].GetHistogram()
		snap := histSnap{t: t, count: h.GetSampleCount()}
		for _, b := range h.GetBucket() {
			snap.bounds = append(snap.bounds, b.GetUpperBound())
			snap.cum = append(snap.cum, b.GetCumulativeCount())
		}
		return snap, true
	}
	return histSnap{}, false
}

// windowLatency estimates the percentiles of the commits between two
// snapshots of the histogram.
func windowLatency(from, to histSnap) *Latency {
	l := &Latency{Window: math.Round(to.t.Sub(from.t).Seconds()*10) / 10}
	if to.count < from.count || len(from.cum) != len(to.cum) {
		return l // the registry was reset; nothing to compare
	}
	l.Commits = to.count - from.count
	if l.Commits == 0 {
		return l
	}
	cum := make([]uint64, len(to.cum))
	for i := range cum {
		cum[i] = to.cum[i] - from.cum[i]
	}
	q := func(q float64) float64 {
		return math.Round(quantile(q, to.bounds, cum, l.Commits)*1e6) / 1e3 // ms, to the microsecond
	}
	l.P50, l.P95, l.P99 = q(0.50), q(0.95), q(0.99)
	return l
}

// quantile interpolates linearly inside the bucket holding rank q*total;
// past the last finite bound it answers that bound.
func quantile(q float64, bounds []float64, cum []uint64, total uint64) float64 {
	rank := q * float64(total)
	lower, below := 0.0, uint64(0)
	for i, upper := range bounds {
		if float64(cum[i]) >= rank {
			if math.IsInf(upper, 1) {
				return lower
			}
			in := cum[i] - below
			if in == 0 {
				return upper
			}
			return lower + (upper-lower)*(rank-float64(below))/float64(in)
		}
		lower, below = upper, cum[i]
	}
	return lower // the rest is in the implicit +Inf bucket
}

// subscribe returns a channel of the coming samples and the samples kept so
// far; cancel ends the subscription. The channel is closed when the monitor
// stops.
func (m *monitor) subscribe() (ch chan Sample, history []Sample, cancel func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch = make(chan Sample, 8)
	history = append([]Sample(nil), m.history...)
	if m.stopped {
		close(ch)
		return ch, history, func() {}
	}
	m.subs[ch] = struct{}{}
	return ch, history, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if _, ok := m.subs[ch]; ok {
			delete(m.subs, ch)
			close(ch)
		}
	}
}

// latest is the last sample; before the first poll it takes one.
func (m *monitor) latest(ctx context.Context) Sample {
	m.mu.Lock()
	n := len(m.history)
	m.mu.Unlock()
	if n == 0 {
		m.record(m.take(ctx))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.history[len(m.history)-1]
}

// events streams the monitor as Server-Sent Events: first "history" (the
// samples kept, for the chart), then one "sample" per poll.
func (s *Service) events(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no") // proxies must not buffer the stream
	ch, history, cancel := s.mon.subscribe()
	defer cancel()
	w.WriteHeader(http.StatusOK)
	send := func(event string, v any) bool {
		b, err := json.Marshal(v)
		if err != nil {
			return false
		}
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if _, err := fmt.Fprint(w, "retry: 2000\n\n"); err != nil {
		return
	}
	if !send("history", history) {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case smp, ok := <-ch:
			if !ok || !send("sample", smp) {
				return
			}
		}
	}
}
