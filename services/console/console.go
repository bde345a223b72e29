// Package console serves Kuma's web console: a live cluster monitor, an
// entity browser with time travel, and a projections page. The pages are
// plain HTML, CSS and JavaScript embedded in the binary; they call a small
// JSON API under /api/ and receive the monitor's samples as Server-Sent
// Events on /api/events.
//
// The console speaks to Kuma only over NATS with the Go client, like any
// other client, so it can run beside any node or alone (`kuma serve --target
// console`). It is read-only unless Config.AllowWrites is set: forget, retry,
// skip and rebuild are refused with 403 otherwise.
package console

import (
	"context"
	"embed"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
)

//go:embed web
var webFiles embed.FS

// Config of the console.
type Config struct {
	// Context is the Kuma context shown (default "default").
	Context string
	// Shards is the context's shard count: the total in "shards online"
	// (0: the number of shards the status lists).
	Shards int
	// Listen is the host:port served (required; port 0 picks a free one).
	Listen string
	// AllowWrites lets the console forget entities and retry, skip or
	// rebuild projections. Off, those requests answer 403.
	AllowWrites bool
	// Gatherer, when set, is the registry of the process the console runs
	// in; the monitor reads the commit latency histogram
	// (kuma_commit_duration_seconds) from it. Without it, or without a
	// shardnode in the process, latency is not shown.
	Gatherer prometheus.Gatherer
	// PollInterval is how often the monitor asks kuma.<ctx>.status
	// (default 1s).
	PollInterval time.Duration
	// NodeName names the process whose memory the monitor shows.
	NodeName string
	// MaxCount bounds the matches the entity browser counts (default
	// 10,000): the entities projection has no count query, so the console
	// pages through the matches to count them.
	MaxCount int
	Logger   *slog.Logger
	Now      func() time.Time
}

// RegisterFlags registers the console's flag on f with its default and
// help: --console-listen (Listen; empty leaves the console off). The rest
// of Config is given by the wiring: the served context and node, and
// AllowWrites, which only the command may decide (kuma up allows writes on
// loopback only).
func (c *Config) RegisterFlags(f *flag.FlagSet) {
	f.StringVar(&c.Listen, "console-listen", "", "host:port of the web console (empty: off; see docs/console.md)")
}

func (c *Config) setDefaults() {
	if c.Context == "" {
		c.Context = kuma.DefaultContext
	}
	if c.PollInterval <= 0 {
		c.PollInterval = time.Second
	}
	if c.MaxCount <= 0 {
		c.MaxCount = 10_000
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if err := kuma.ValidateContext(c.Context); err != nil {
		errs = append(errs, fmt.Errorf("console: %w", err))
	}
	if c.Listen == "" {
		errs = append(errs, errors.New("console: Listen is required (host:port, e.g. 127.0.0.1:9480)"))
	} else if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("console: Listen %q: want host:port: %v", c.Listen, err))
	}
	if c.Shards < 0 {
		errs = append(errs, fmt.Errorf("console: Shards must be 0 or more, got %d", c.Shards))
	}
	return errors.Join(errs...)
}

// Service is a running console. Start and Stop must not run concurrently;
// the HTTP handlers are safe for concurrent use.
type Service struct {
	cfg    Config
	client *client.Client
	mon    *monitor
	srv    *http.Server
	ln     net.Listener
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New builds a console over nc, which the caller owns. It does no I/O.
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if nc == nil {
		return nil, errors.New("console: a NATS connection is required")
	}
	c, err := client.New(nc, client.Options{Context: cfg.Context, Timeout: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, client: c}
	s.mon = newMonitor(cfg, c)
	return s, nil
}

// Start listens on Config.Listen and starts the monitor's poller; it
// returns once the address is bound.
func (s *Service) Start(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("console: listen on %s: %w", s.cfg.Listen, err)
	}
	s.ln = ln
	s.srv = &http.Server{Handler: s.handler(), ReadHeaderTimeout: 5 * time.Second}
	runCtx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		s.mon.run(runCtx)
	}()
	go func() {
		defer s.wg.Done()
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.cfg.Logger.Error("console server stopped", "err", err)
		}
	}()
	s.cfg.Logger.Info("console serving", "addr", s.Addr(), "writes", s.cfg.AllowWrites)
	return nil
}

// Stop ends the event streams, stops serving and waits for the poller.
func (s *Service) Stop(ctx context.Context) error {
	if s.srv == nil {
		return nil
	}
	s.cancel() // ends the poller and, through it, every open event stream
	err := s.srv.Shutdown(ctx)
	s.wg.Wait()
	s.srv = nil
	return err
}

// Addr is the address served ("" before Start), with the port chosen when
// Listen asked for port 0.
func (s *Service) Addr() string {
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}

// URL is the console's address as a browser opens it.
func (s *Service) URL() string { return "http://" + s.Addr() + "/" }

func (s *Service) handler() http.Handler {
	mux := http.NewServeMux()
	web, _ := fs.Sub(webFiles, "web")
	files := http.FileServerFS(web)
	mux.Handle("/", static(files))
	mux.HandleFunc("GET /api/info", s.info)
	mux.HandleFunc("GET /api/status", s.status)
	mux.HandleFunc("GET /api/events", s.events)
	mux.HandleFunc("GET /api/entities", s.listEntities)
	mux.HandleFunc("GET /api/entities/{id}", s.readEntity)
	mux.HandleFunc("GET /api/entities/{id}/history", s.history)
	mux.HandleFunc("GET /api/entities/{id}/export", s.export)
	mux.HandleFunc("POST /api/entities/{id}/forget", s.writes(s.forget))
	mux.HandleFunc("GET /api/projections", s.projections)
	mux.HandleFunc("POST /api/projections/{name}/retry", s.writes(s.retry))
	mux.HandleFunc("POST /api/projections/{name}/skip", s.writes(s.skip))
	mux.HandleFunc("POST /api/projections/{name}/rebuild", s.writes(s.rebuild))
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, kuma.Errorf(kuma.CodeNotFound, "no API endpoint %s %s", r.Method, r.URL.Path))
	})
	return s.guardHost(mux)
}

// static serves the embedded pages to GET and HEAD. Browsers revalidate
// them, so a new binary's pages are never mixed with an old script.
func static(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Cache-Control", "no-cache")
		h.ServeHTTP(w, r)
	})
}
