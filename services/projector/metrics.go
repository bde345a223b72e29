package projector

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the projector's collectors, on the registry its config names.
type metrics struct {
	requests *prometheus.CounterVec
	// repliesFailed counts answers counted in requests that NATS then
	// did not take (the size is checked before; a closing connection).
	repliesFailed *prometheus.CounterVec
	applied       *prometheus.CounterVec
	applySeconds  prometheus.Histogram
	// ignoredNotices counts forget notices the keyvault did not confirm.
	ignoredNotices prometheus.Counter
	// stalls counts durables recreated because an ack was pending that no
	// delivery held (generation.stalled).
	stalls prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, s *Service) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_projector_requests_total",
			Help: "Projector requests (query, rebuild, retry, skip, status) by protocol code (ok for success).",
		}, []string{"op", "code"}),
		repliesFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_projector_replies_failed_total",
			Help: "Projector answers that could not be published, by operation and the protocol code of the failure: the client got no answer.",
		}, []string{"op", "code"}),
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kuma_projection_events_applied_total",
			Help: "Events applied to read models, by projection (rebuilds included).",
		}, []string{"projection"}),
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kuma_projection_apply_duration_seconds",
			Help:    "Duration of applying one stream message to a read model: one transaction.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		ignoredNotices: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kuma_projector_forget_notices_ignored_total",
			Help: "Forget notices in the stream for an entity the keyvault says is not forgotten (forged, or malformed): nothing was dropped.",
		}),
		stalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kuma_projector_consumer_stalls_total",
			Help: "Durable consumers recreated at the read model's position because they waited for an ack no delivery held (their leader was lost between a delivery and its ack).",
		}),
	}
	lag := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kuma_projection_lag_messages_max",
		Help: "Stream messages the furthest-behind live projection has yet to apply.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		st, err := s.Status(ctx)
		if err != nil {
			return 0
		}
		var worst int64
		for _, p := range st {
			worst = max(worst, p.Lag)
		}
		return float64(worst)
	})
	hits := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "kuma_projector_key_cache_hits_total", Help: "Projector data-key cache hits."},
		func() float64 { h, _ := s.keys.Stats(); return float64(h) })
	misses := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "kuma_projector_key_cache_misses_total", Help: "Projector data-key cache misses (keyvault calls)."},
		func() float64 { _, m := s.keys.Stats(); return float64(m) })
	for _, c := range []prometheus.Collector{m.requests, m.repliesFailed, m.applied, m.applySeconds, m.ignoredNotices, m.stalls, lag, hits, misses} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
