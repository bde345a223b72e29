package app

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// opsModule serves /metrics (the App's registry), /healthz (the process is
// alive) and /readyz (it can serve: NATS connected, shards open) on
// MetricsListen. Without MetricsListen it only registers the process-wide
// collectors.
type opsModule struct {
	app *App
	srv *http.Server
	ln  net.Listener
}

func (m *opsModule) Start(ctx context.Context) error {
	reg := m.app.registry
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kuma_nats_connected", Help: "1 while this process's NATS connection is up."},
			func() float64 {
				if nc := m.app.nc; nc != nil && nc.IsConnected() {
					return 1
				}
				return 0
			}),
	} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("ops: %w", err)
		}
	}
	if m.app.cfg.MetricsListen == "" {
		return nil
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if problems := m.app.notReady(); len(problems) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready: "+strings.Join(problems, "; "))
			return
		}
		fmt.Fprintln(w, "ready")
	})
	if m.app.cfg.Pprof {
		// On this mux only: importing net/http/pprof also registers these
		// on http.DefaultServeMux, which Kuma never serves.
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	ln, err := net.Listen("tcp", m.app.cfg.MetricsListen)
	if err != nil {
		return fmt.Errorf("ops: listen on %s: %w", m.app.cfg.MetricsListen, err)
	}
	m.ln = ln
	m.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := m.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.app.cfg.Logger.Error("ops server stopped", "err", err)
		}
	}()
	return nil
}

func (m *opsModule) Stop(ctx context.Context) error {
	if m.srv == nil {
		return nil
	}
	return m.srv.Shutdown(ctx)
}

// MetricsAddr is where /metrics is served ("" when it is not).
func (a *App) MetricsAddr() string {
	for _, s := range a.started {
		if m, ok := s.svc.(*opsModule); ok && m.ln != nil {
			return m.ln.Addr().String()
		}
	}
	return ""
}

// notReady lists why the process cannot serve now.
func (a *App) notReady() []string {
	var out []string
	if a.nc == nil || !a.nc.IsConnected() {
		out = append(out, "NATS is not connected")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if sn := a.Shardnode(); sn != nil {
		// Ready means serving the shards placed on this node (rendezvous
		// hashing or a pin): all of them when it is alone, its share in a
		// cluster. Shards moving to it keep it unready until it serves them.
		// Read from this node's caches: a probe asks no other member.
		if missing := sn.Unserved(a.cfg.Context); len(missing) > 0 {
			ids := make([]string, len(missing))
			for i, n := range missing {
				ids[i] = strconv.Itoa(n)
			}
			out = append(out, fmt.Sprintf("shards %s are placed on this node but not served by it yet", strings.Join(ids, ",")))
		}
	}
	if pr := a.Projector(); pr != nil {
		st, err := pr.Status(ctx)
		if err != nil {
			out = append(out, "projections: "+err.Error())
		}
		for _, p := range st {
			// A stopped projection waits for an operator (retry or skip),
			// however little it is behind: queries would answer stale.
			if p.State == "stopped" && p.Error != nil {
				out = append(out, fmt.Sprintf("projection %s is stopped at %s: %s", p.Name, p.Error.Position, p.Error.Message))
				continue
			}
			if p.Lag > a.cfg.ReadyMaxLag {
				out = append(out, fmt.Sprintf("projection %s is %d stream messages behind (ready at %d)", p.Name, p.Lag, a.cfg.ReadyMaxLag))
			}
		}
	}
	return out
}
