package shardnode

import (
	"context"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/services/shardnode/entity"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the shardnode's Prometheus collectors, registered on the
// registry its config names (never the global one), so several nodes in one
// process do not collide.
type metrics struct {
	requests    *prometheus.CounterVec
	appended    prometheus.Counter
	commitTime  prometheus.Histogram
	commitBatch prometheus.Histogram
	syncTime    prometheus.Histogram
	moves       *prometheus.CounterVec
	fenced      *prometheus.CounterVec
	corrupt     *prometheus.GaugeVec
	diskFull    prometheus.Counter
	mailboxFull prometheus.Counter
	// repliesFailed counts answers that were counted in requests and
	// then could not be published; with the size check before the count
	// (entity.Actor.handle), only a connection closing under the reply lands here.
	repliesFailed *prometheus.CounterVec
	// entity is the actors' share of these (entity.Metrics).
	entity *entity.Metrics
}

// newMetrics makes and registers the node's counters and histograms, which
// the shards and actors count into; the gauges, read from the node when
// scraped, are the node's own (registerGauges). So a shard's tests make
// these without a node.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_requests_total",
			Help: "Entity requests answered by the shardnode, by operation and protocol code (ok for success).",
		}, []string{"op", "code"}),
		appended: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kuma_events_appended_total",
			Help: "Events committed by appends (duplicates of an idempotent retry not counted).",
		}),
		commitTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kuma_commit_duration_seconds",
			Help:    "Duration of one group commit: the transaction and its fsync.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		syncTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kuma_commit_fsync_duration_seconds",
			Help:    "Duration of a group commit's COMMIT, where SQLite (WAL mode) fsyncs.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}),
		commitBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kuma_commit_batch_events",
			Help:    "Events written by one group commit.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 9),
		}),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_shard_moves_total",
			Help: "Shards this node took (in), handed off (out) or lost to a newer owner (lost).",
		}, []string{"direction"}),
		fenced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_shard_fenced_total",
			Help: "Writes refused because this node no longer owns the shard: its lease ran out (reason lease, per commit group) or the file carries a newer owner's epoch (reason epoch, per request).",
		}, []string{"reason"}),
		corrupt: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kuma_shard_corrupt",
			Help: "1 for a shard this node took out of service because its file is damaged (corrupt.go); the shard answers internal until an operator restores it.",
		}, []string{"context", "shard"}),
		diskFull: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kuma_disk_full_total",
			Help: "Requests whose write the disk holding the shard files had no room for (nothing was stored).",
		}),
		mailboxFull: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kuma_mailbox_full_total",
			Help: "Requests refused as unavailable because their entity already had a full mailbox waiting.",
		}),
		repliesFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_replies_failed_total",
			Help: "Answers that could not be published, by operation and the protocol code of the failure (payload_too_large, internal): the client got no answer and times out.",
		}, []string{"op", "code"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.appended, m.commitTime, m.commitBatch, m.syncTime, m.moves, m.fenced, m.corrupt, m.diskFull, m.mailboxFull, m.repliesFailed} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	m.entity = &entity.Metrics{Requests: m.requests, Appended: m.appended, Fenced: m.fenced}
	return m, nil
}

// registerGauges registers the gauges read from the node when scraped: its
// shards' actors and relay lag, its key cache, its contexts' streams.
func (s *Service) registerGauges(reg prometheus.Registerer) error {
	gauges := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kuma_live_actors", Help: "Entity actors in memory."},
			func() float64 { return float64(s.sum(func(st ShardStats) int64 { return int64(st.LiveActors) })) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "kuma_passivations_total", Help: "Entity actors passivated (idle or over the actor bound)."},
			func() float64 { return float64(s.sum(func(st ShardStats) int64 { return st.Passivated })) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "kuma_key_cache_hits_total", Help: "Data-key cache hits."},
			func() float64 { h, _ := s.keys.Stats(); return float64(h) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "kuma_key_cache_misses_total", Help: "Data-key cache misses (keyvault calls)."},
			func() float64 { _, m := s.keys.Stats(); return float64(m) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kuma_relay_lag_events", Help: "Events committed but not yet in the event stream."},
			func() float64 { return float64(s.sum(func(st ShardStats) int64 { return st.RelayLag })) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kuma_shards_open", Help: "Shards this node has open."},
			func() float64 { return float64(len(s.Stats())) }),
	}
	// One stream info request per scrape gives both stream gauges.
	gauges = append(gauges, &streamCollector{s: s,
		reachable: prometheus.NewDesc("kuma_stream_reachable", "1 while the context's event stream answers.", []string{"context"}, nil),
		messages:  prometheus.NewDesc("kuma_stream_messages", "Messages the context's event stream holds.", []string{"context"}, nil),
	})
	for _, c := range gauges {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// replyFailed counts an answer to op that NATS did not take.
func (m *metrics) replyFailed(op string, err error) {
	m.repliesFailed.WithLabelValues(op, string(natsbus.ReplyFailureCode(err))).Inc()
}

func (m *metrics) onGroup(commits, events int, took, sync time.Duration) {
	if events == 0 {
		return // bookkeeping (the relay's note, a forget), not appends
	}
	m.commitTime.Observe(took.Seconds())
	m.syncTime.Observe(sync.Seconds())
	m.commitBatch.Observe(float64(events))
}

func (s *Service) sum(f func(ShardStats) int64) int64 {
	var n int64
	for _, st := range s.Stats() {
		n += f(st)
	}
	return n
}

// streamCollector reports each context's event stream from one info request
// per context and scrape.
type streamCollector struct {
	s                   *Service
	reachable, messages *prometheus.Desc
}

func (c *streamCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.reachable
	ch <- c.messages
}

func (c *streamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, cc := range c.s.cfg.Contexts {
		var up, msgs float64
		if n, ok := c.info(cc.Name); ok {
			up, msgs = 1, float64(n)
		}
		ch <- prometheus.MustNewConstMetric(c.reachable, prometheus.GaugeValue, up, cc.Name)
		ch <- prometheus.MustNewConstMetric(c.messages, prometheus.GaugeValue, msgs, cc.Name)
	}
}

func (c *streamCollector) info(name string) (uint64, bool) {
	if c.s.js == nil { // not started
		return 0, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st, err := c.s.js.Stream(ctx, kuma.StreamName(name))
	if err != nil {
		return 0, false
	}
	i, err := st.Info(ctx)
	if err != nil {
		return 0, false
	}
	return i.State.Msgs, true
}
