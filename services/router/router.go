// Package router is Kuma's stateless front door. It takes the public entity
// subjects kuma.<ctx>.<op>.<entity>, hashes the entity onto its context's
// shard, forwards the request to that shard's internal subject and relays
// the shardnode's answer to the client. Routers share a queue group: run as
// many as you like. Each takes only the contexts it serves, so deployments
// with different contexts can share one NATS.
//
// The router asks with a reply inbox of its own rather than passing the
// client's on. That costs one hop on the way back, and buys two things:
//
//   - While a shard moves between nodes nobody subscribes to its subject for
//     a moment. NATS tells only the publisher of a request that nobody
//     listened (a 503 status on the publisher's own reply subscription), so
//     a router passing the client's inbox along could not know, and the
//     client would wait for its whole timeout. Knowing, the router holds the
//     request and sends it again until the new owner answers (HoldFor),
//     then answers unavailable, which every client may retry. Nothing is
//     lost by sending again: a 503 means no shardnode received it.
//   - A client's reply subject is checked (kuma.ReplyAllowed) and only the
//     router writes to it, so a client cannot make a shardnode publish its
//     answer into an event stream.
package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/singleflight"
)

// Version is the router's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// QueueGroup is shared by all routers so each request is forwarded once.
const QueueGroup = "kuma-router"

// Config of a router.
type Config struct {
	// Contexts maps each served context to its shard count; 0 means ask a
	// shardnode of the context (shards.go).
	Contexts map[string]int
	// HoldFor is how long a request whose shard has no owner answering is
	// held and sent again before the client gets unavailable (default 2 s:
	// a live move leaves a shard unowned for a few hundred milliseconds; a
	// failover takes about a lease TTL, and clients retry unavailable).
	HoldFor time.Duration
	// MaxPending bounds the requests forwarded and not yet answered
	// (default 65,536); beyond it the router answers unavailable at once,
	// so a flood cannot grow its memory without bound.
	MaxPending int
	// MaxWait is how long the router remembers a forwarded request with no
	// answer (default 1 minute): its shardnode died holding it, and the
	// client has long given up.
	MaxWait time.Duration
	// Registerer receives the router's metrics (nil: not exported).
	Registerer prometheus.Registerer
	// TracerProvider traces each forward (nil: off).
	TracerProvider trace.TracerProvider
	Logger         *slog.Logger
}

func (c *Config) setDefaults() {
	if c.HoldFor <= 0 {
		c.HoldFor = 2 * time.Second
	}
	if c.MaxPending <= 0 {
		c.MaxPending = 1 << 16
	}
	if c.MaxWait <= 0 {
		c.MaxWait = time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if len(c.Contexts) == 0 {
		errs = append(errs, errors.New("router: at least one context is required"))
	}
	for name, shards := range c.Contexts {
		if err := kuma.ValidateContext(name); err != nil {
			errs = append(errs, fmt.Errorf("router: %w", err))
		}
		if shards < 0 {
			errs = append(errs, fmt.Errorf("router: context %q: shards must be 1 or more, or 0 to ask a shardnode; got %d", name, shards))
		}
	}
	return errors.Join(errs...)
}

// Service is a running router. Its methods are safe for concurrent use.
type Service struct {
	cfg    Config
	nc     *nats.Conn
	svc    *natsbus.Service
	tracer trace.Tracer

	// inbox roots the router's reply subjects: inbox.<token>, one token
	// per forwarded request.
	inbox  string
	sub    *nats.Subscription
	token  atomic.Uint64
	mu     sync.Mutex
	wait   map[string]*pending // token → request waiting for its answer
	closed bool
	sweep  chan struct{}
	swept  sync.WaitGroup

	forwarded, held, unavailable, dropped, refused, relayFailed atomic.Int64
	feedPages, feedShared                                       atomic.Int64

	// The feed (feed.go): requests served at once, and the context that
	// ends their waits when the router stops.
	feedSlots  chan struct{}
	feeds      sync.WaitGroup
	feedCtx    context.Context
	feedCancel context.CancelFunc
	feedFlight singleflight.Group // alike feed requests in flight share a page

	counts *shardCounts
}

// New builds a router over nc. It does no I/O.
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if nc == nil {
		return nil, errors.New("router: a NATS connection is required")
	}
	s := &Service{cfg: cfg, nc: nc, tracer: telemetry.Tracer(cfg.TracerProvider), wait: map[string]*pending{},
		feedSlots: make(chan struct{}, maxFeedWaiting), counts: newShardCounts(nc, cfg.Contexts)}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_forwarded_total",
				Help: "Requests the router forwarded to a shard subject.",
			}, func() float64 { return float64(s.forwarded.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_held_total",
				Help: "Requests sent again because no shard owner was subscribed (a shard moving or failing over).",
			}, func() float64 { return float64(s.held.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_unavailable_total",
				Help: "Requests answered unavailable by the router: no owner within the hold time, or too many pending.",
			}, func() float64 { return float64(s.unavailable.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_refused_replies_total",
				Help: "Requests dropped because their reply subject lies in a Kuma or NATS namespace.",
			}, func() float64 { return float64(s.refused.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_relay_failed_total",
				Help: "Answers the router could not relay to the client (it answered an error instead).",
			}, func() float64 { return float64(s.relayFailed.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_feed_pages_total",
				Help: "Feed pages answered.",
			}, func() float64 { return float64(s.feedPages.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "kuma_router_feed_shared_total",
				Help: "Feed requests answered with a page made once for alike requests in flight at the same time (each such request counted).",
			}, func() float64 { return float64(s.feedShared.Load()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "kuma_router_pending",
				Help: "Requests forwarded and not yet answered.",
			}, func() float64 { return float64(s.Pending()) }),
		} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("router: metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Start subscribes to the router's reply inbox and registers the router as
// the NATS micro service "kuma-router" with one endpoint per entity
// operation.
func (s *Service) Start(ctx context.Context) error {
	s.inbox = s.nc.NewInbox()
	sub, err := s.nc.Subscribe(s.inbox+".*", s.onAnswer)
	if err != nil {
		return fmt.Errorf("router: subscribe to its inbox: %w", err)
	}
	// Answers are relayed as fast as they come; the buffer absorbs bursts
	// of up to MaxPending answers.
	if err := sub.SetPendingLimits(s.cfg.MaxPending, 512<<20); err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("router: %w", err)
	}
	s.sub = sub
	svc, err := natsbus.AddService(s.nc, natsbus.ServiceConfig{
		Name:        "kuma-router",
		Version:     Version,
		Description: "Routes kuma.<ctx>.<op>.<entity> requests to the entity's shard",
		QueueGroup:  QueueGroup,
		Refused: func(_, reply string) {
			// Answering would publish into the namespace the reply names.
			s.refused.Add(1)
			s.cfg.Logger.Debug("request dropped: its reply subject is in a reserved namespace", "reply", reply)
		},
	})
	if err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("router: register micro service: %w", err)
	}
	// One endpoint per served context and operation, never kuma.*.<op>.*:
	// routers of several deployments may share one NATS, and a router that
	// took another context's request from the shared queue group could only
	// answer not_found. Routers of one context subscribe to the same
	// subjects, so each request still goes to one of them. The contexts
	// are fixed by the configuration: a router serves a new context once it
	// is restarted with it.
	s.feedCtx, s.feedCancel = context.WithCancel(context.Background())
	for _, name := range slices.Sorted(maps.Keys(s.cfg.Contexts)) {
		for _, op := range kuma.EntityOps {
			subject := kuma.PublicPrefix + "." + name + "." + op + ".*"
			if err := svc.AddEndpoint(op+"-"+name, subject, micro.HandlerFunc(s.forward)); err != nil {
				_ = svc.Stop()
				_ = sub.Unsubscribe()
				return fmt.Errorf("router: add endpoint %s: %w", subject, err)
			}
		}
		if err := svc.AddEndpoint("feed-"+name, kuma.FeedSubject(name), s.feedHandler(name)); err != nil {
			_ = svc.Stop()
			_ = sub.Unsubscribe()
			return fmt.Errorf("router: add the feed endpoint of %q: %w", name, err)
		}
	}
	if err := natsbus.Flush(ctx, s.nc); err != nil {
		_ = svc.Stop()
		_ = sub.Unsubscribe()
		return fmt.Errorf("router: flush: %w", err)
	}
	s.svc = svc
	s.sweep = make(chan struct{})
	s.swept.Add(1)
	go s.sweepLoop()
	s.cfg.Logger.Info("router started", "contexts", len(s.cfg.Contexts))
	return nil
}

// Forwarded returns how many requests this router forwarded.
func (s *Service) Forwarded() int64 { return s.forwarded.Load() }

// Held returns how many times a request was sent again because no shard
// owner was subscribed.
func (s *Service) Held() int64 { return s.held.Load() }

// Unavailable returns how many requests the router answered unavailable.
func (s *Service) Unavailable() int64 { return s.unavailable.Load() }

// RelayFailed returns how many answers the router could not relay (the
// client got an error instead).
func (s *Service) RelayFailed() int64 { return s.relayFailed.Load() }

// Refused returns how many requests were dropped for a reserved reply subject.
func (s *Service) Refused() int64 { return s.refused.Load() }

// FeedShared is how many feed pages were answered with another alike
// request's page.
func (s *Service) FeedShared() int64 { return s.feedShared.Load() }

// Pending returns how many forwarded requests wait for their answer.
func (s *Service) Pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.wait)
}

// stopPendingMax bounds Stop's wait for the answers to forwarded requests.
// A commit answers in milliseconds; one still unanswered after this long
// waits on something that may not come back soon (a stream without its
// quorum while the whole cluster stops), and the node's stop must fit in
// its grace period (docker-compose kills after 10 s). Its client retries
// with the same idempotency key, which is safe whatever the owner did.
const stopPendingMax = 2 * time.Second

// Stop deregisters the service, so no new request comes in, waits (within
// ctx and stopPendingMax) for the answers to requests already forwarded, and answers the rest
// unavailable before it stops listening: a client retries those elsewhere
// instead of waiting out its timeout.
func (s *Service) Stop(ctx context.Context) error {
	if s.svc == nil {
		return nil
	}
	err := s.svc.Stop()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	wait, cancel := context.WithTimeout(ctx, stopPendingMax)
	defer cancel()
	for s.Pending() > 0 && wait.Err() == nil {
		select {
		case <-wait.Done():
		case <-time.After(5 * time.Millisecond):
		}
	}
	s.mu.Lock()
	left := s.wait
	s.wait = map[string]*pending{}
	s.mu.Unlock()
	for _, p := range left {
		s.unavailable.Add(1)
		p.span.End()
		s.answer(p.reply, kuma.Errorf(kuma.CodeUnavailable, "router stopped before %s answered; retry with the same idempotency key", p.msg.Subject))
	}
	s.feedCancel() // waiting feed requests answer unavailable now
	s.feeds.Wait()
	close(s.sweep)
	s.swept.Wait()
	s.svc = nil
	return errors.Join(err, s.sub.Unsubscribe())
}
