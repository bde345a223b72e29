package app_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/projection"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value returns the metric with exactly these labels (counter, gauge or a
// histogram's count).
func value(fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.Metric {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.Label {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

// TestMetricsCountTheWorkload runs a known workload and scrapes /metrics.
func TestMetricsCountTheWorkload(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.MetricsListen = "127.0.0.1:0" })
	c := n.Client(client.Options{NoAutoIdempotencyKey: true})
	ctx := t.Context()
	for i := 0; i < 10; i++ {
		if _, err := c.Append(ctx, fmt.Sprintf("m-%d", i%4), markerEvents(3)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 5; i++ {
		if _, err := c.Read(ctx, "m-1"); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 2; i++ {
		if _, err := c.Append(ctx, "m-1", markerEvents(1), client.ExpectVersion(0)); kuma.ErrorCode(err) != kuma.CodeVersionConflict {
			t.Fatalf("want a conflict, got %v", err)
		}
	}
	if _, err := c.Read(ctx, "nobody"); kuma.ErrorCode(err) != kuma.CodeNotFound {
		t.Fatal(err)
	}
	kumatest.StreamEvents(t, n.NC, "default", 30)
	// Wait until the entities projection has applied all 30 events.
	deadline := time.Now().Add(10 * time.Second)
	for value(scrape(t, n.App.MetricsAddr()), "kuma_projection_events_applied_total", "projection", "entities") < 30 {
		if time.Now().After(deadline) {
			t.Fatal("the entities projection did not apply the workload")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := c.Query(ctx, "entities", &kuma.QueryRequest{Limit: 2}); err != nil {
		t.Fatal(err)
	}

	f := scrape(t, n.App.MetricsAddr())
	for _, w := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kuma_requests_total", []string{"op", "append", "code", "ok"}, 10},
		{"kuma_requests_total", []string{"op", "read", "code", "ok"}, 5},
		{"kuma_requests_total", []string{"op", "append", "code", "version_conflict"}, 2},
		{"kuma_requests_total", []string{"op", "read", "code", "not_found"}, 1},
		{"kuma_events_appended_total", nil, 30},
		{"kuma_router_forwarded_total", nil, 18},
		{"kuma_nats_connected", nil, 1},
		{"kuma_shards_open", nil, float64(n.Cfg.Shards)},
		{"kuma_relay_lag_events", nil, 0},
		{"kuma_projection_events_applied_total", []string{"projection", "entities"}, 30},
		{"kuma_projector_requests_total", []string{"op", "query", "code", "ok"}, 1},
		{"kuma_projection_lag_messages_max", nil, 0},
		{"kuma_stream_reachable", []string{"context", "default"}, 1},
	} {
		if got := value(f, w.name, w.labels...); got != w.want {
			t.Errorf("%s%v = %v, want %v", w.name, w.labels, got, w.want)
		}
	}
	// Every commit group is observed; 10 appends need at least one group
	// and at most ten.
	if g := value(f, "kuma_commit_duration_seconds"); g < 1 || g > 10 {
		t.Errorf("kuma_commit_duration_seconds count = %v, want 1..10", g)
	}
	// Plus one epoch claim per shard, published when the node took it.
	claims := float64(n.Cfg.Shards)
	if m := value(f, "kuma_stream_messages", "context", "default"); m < 1+claims || m > 10+claims {
		t.Errorf("kuma_stream_messages = %v, want the relay's 1 to 10 messages for 10 appends and %v epoch claims", m, claims)
	}
	if g, c := value(f, "kuma_commit_fsync_duration_seconds"), value(f, "kuma_commit_duration_seconds"); g != c {
		t.Errorf("fsync observed %v times, commit groups %v; want one each", g, c)
	}
	if v := value(f, "kuma_key_cache_misses_total"); v < 4 {
		t.Errorf("key cache misses = %v, want at least one per new entity (4)", v)
	}
	if value(f, "go_goroutines") <= 0 || value(f, "process_resident_memory_bytes") <= 0 {
		t.Error("the Go and process collectors are missing")
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitReadyz polls the node's /readyz until it answers wantCode with
// wantText in its body, for at most 20 seconds.
func waitReadyz(t *testing.T, n *kumatest.Node, wantCode int, wantText string) {
	t.Helper()
	base := "http://" + n.App.MetricsAddr()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := get(t, base+"/readyz")
		if code == wantCode && strings.Contains(body, wantText) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz = %d %q, want %d with %q", code, body, wantCode, wantText)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReadyzFollowsNATS runs a shardnode against an external NATS server,
// stops that server and starts it again on the same port: /readyz turns
// unready and ready again; /healthz stays ok throughout.
func TestReadyzFollowsNATS(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	store := t.TempDir()
	listen := "127.0.0.1:" + strconv.Itoa(port)
	srv, err := natsbus.StartServer(t.Context(), natsbus.ServerConfig{Listen: listen, StoreDir: store})
	if err != nil {
		t.Fatal(err)
	}
	a, err := app.New(app.Config{Target: app.ModuleRouter, NATSURL: srv.ClientURL(), DataDir: t.TempDir(), Shards: 2, MetricsListen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer a.Stop(t.Context())
	base := "http://" + a.MetricsAddr()
	waitFor := func(wantCode int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			code, body := get(t, base+"/readyz")
			if code == wantCode {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("/readyz = %d %q, want %d", code, body, wantCode)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor(http.StatusOK)
	srv.Shutdown()
	srv.WaitForShutdown()
	waitFor(http.StatusServiceUnavailable)
	if code, body := get(t, base+"/readyz"); !strings.Contains(body, "NATS") {
		t.Fatalf("/readyz %d %q does not say why", code, body)
	}
	if code, _ := get(t, base+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d while NATS is down; the process is alive", code)
	}
	srv, err = natsbus.StartServer(t.Context(), natsbus.ServerConfig{Listen: listen, StoreDir: store})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	waitFor(http.StatusOK)
}

// TestReadyzFollowsProjectionLag: a projection further behind than
// ReadyMaxLag makes /readyz say so; once it has caught up, ready again.
func TestReadyzFollowsProjectionLag(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.MetricsListen = "127.0.0.1:0"
		c.ReadyMaxLag = 2
		c.Projections = []projection.Spec{{
			Name:    "strict",
			Tables:  []string{`CREATE TABLE seen (entity TEXT NOT NULL, n INTEGER NOT NULL CHECK (n >= 0))`},
			On:      map[string]string{"Counted": `INSERT INTO seen VALUES (:entity, :n)`},
			Queries: map[string]projection.Query{"all": {SQL: `SELECT * FROM seen`}},
		}}
	})
	c := n.Client(client.Options{})
	waitFor := func(wantCode int, wantText string) { t.Helper(); waitReadyz(t, n, wantCode, wantText) }
	waitFor(http.StatusOK, "ready")
	// A poison event stops the projection; the events after it pile up.
	bad, err := c.Append(t.Context(), "e-0", []kuma.EventInput{{Type: "Counted", Data: json.RawMessage(`{"n":-1}`)}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		if _, err := c.Append(t.Context(), fmt.Sprintf("e-%d", i), []kuma.EventInput{{Type: "Counted", Data: json.RawMessage(`{"n":1}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(http.StatusServiceUnavailable, "projection strict is")
	if err := c.SkipProjection(t.Context(), "strict", bad.Position); err != nil {
		t.Fatal(err)
	}
	waitFor(http.StatusOK, "ready")
}

// TestPprofOnlyWhenAsked: Go's profiles are on the metrics listener only with
// Pprof set, and then a heap profile and a short CPU profile come back in
// pprof's format (gzip).
func TestPprofOnlyWhenAsked(t *testing.T) {
	off := kumatest.Start(t, func(c *app.Config) { c.MetricsListen = "127.0.0.1:0" })
	if code, _ := get(t, "http://"+off.App.MetricsAddr()+"/debug/pprof/heap"); code != http.StatusNotFound {
		t.Fatalf("without Pprof /debug/pprof/heap = %d, want 404", code)
	}
	on := kumatest.Start(t, func(c *app.Config) { c.MetricsListen = "127.0.0.1:0"; c.Pprof = true })
	for _, path := range []string{"/debug/pprof/heap", "/debug/pprof/profile?seconds=1"} {
		code, body := get(t, "http://"+on.App.MetricsAddr()+path)
		if code != http.StatusOK || !strings.HasPrefix(body, "\x1f\x8b") {
			t.Fatalf("%s = %d, %d bytes, want 200 and a gzipped profile", path, code, len(body))
		}
	}
}
