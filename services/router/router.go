// Package router is Kuma's stateless front door. It takes the public entity
// subjects kuma.<ctx>.<op>.<entity>, hashes the entity onto its context's
// shard and forwards the request to that shard's internal subject, keeping
// the client's reply inbox so the answer goes straight back from the
// shardnode. Routers share a queue group: run as many as you like.
package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// Version is the router's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// QueueGroup is shared by all routers so each request is forwarded once.
const QueueGroup = "kuma-router"

// Config of a router.
type Config struct {
	// Contexts maps each served context to its shard count.
	Contexts map[string]int
	// Registerer receives the router's metrics (nil: not exported).
	Registerer prometheus.Registerer
	// TracerProvider traces each forward (nil: off).
	TracerProvider trace.TracerProvider
	Logger         *slog.Logger
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
		if shards < 1 {
			errs = append(errs, fmt.Errorf("router: context %q: shards must be 1 or more, got %d", name, shards))
		}
	}
	return errors.Join(errs...)
}

// Service is a running router. Its methods are safe for concurrent use.
type Service struct {
	cfg       Config
	nc        *nats.Conn
	svc       micro.Service
	forwarded atomic.Int64
	tracer    trace.Tracer
}

// New builds a router over nc. It does no I/O.
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if nc == nil {
		return nil, errors.New("router: a NATS connection is required")
	}
	s := &Service{cfg: cfg, nc: nc, tracer: telemetry.Tracer(cfg.TracerProvider)}
	if cfg.Registerer != nil {
		err := cfg.Registerer.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "kuma_router_forwarded_total",
			Help: "Requests the router forwarded to a shard subject.",
		}, func() float64 { return float64(s.forwarded.Load()) }))
		if err != nil {
			return nil, fmt.Errorf("router: metrics: %w", err)
		}
	}
	return s, nil
}

// Start registers the router as the NATS micro service "kuma-router" with one
// endpoint per entity operation.
func (s *Service) Start(ctx context.Context) error {
	svc, err := micro.AddService(s.nc, micro.Config{
		Name:        "kuma-router",
		Version:     Version,
		Description: "Routes kuma.<ctx>.<op>.<entity> requests to the entity's shard",
		QueueGroup:  QueueGroup,
	})
	if err != nil {
		return fmt.Errorf("router: register micro service: %w", err)
	}
	for _, op := range kuma.EntityOps {
		subject := kuma.PublicPrefix + ".*." + op + ".*"
		if err := svc.AddEndpoint(op, micro.HandlerFunc(s.forward), micro.WithEndpointSubject(subject)); err != nil {
			_ = svc.Stop()
			return fmt.Errorf("router: add endpoint %s: %w", subject, err)
		}
	}
	if err := natsbus.Flush(ctx, s.nc); err != nil {
		_ = svc.Stop()
		return fmt.Errorf("router: flush: %w", err)
	}
	s.svc = svc
	s.cfg.Logger.Info("router started", "contexts", len(s.cfg.Contexts))
	return nil
}

// forward sends the request on to its shard. It answers only when it cannot
// forward; otherwise the shardnode answers the client directly.
func (s *Service) forward(req micro.Request) {
	ctxName, op, entity, ok := kuma.ParseEntitySubject(req.Subject())
	if !ok {
		s.fail(req, kuma.Errorf(kuma.CodeBadRequest, "subject %q is not kuma.<ctx>.<op>.<entity>", req.Subject()))
		return
	}
	shards, ok := s.cfg.Contexts[ctxName]
	if !ok {
		s.fail(req, kuma.Errorf(kuma.CodeNotFound, "context %q is not served here", ctxName))
		return
	}
	if err := kuma.ValidateEntityID(entity); err != nil {
		s.fail(req, err)
		return
	}
	shard := placement.ShardOf(entity, shards)
	hdr := nats.Header(req.Headers())
	ctx, span := s.tracer.Start(telemetry.Extract(context.Background(), hdr), "kuma.router forward",
		trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("kuma.op", op), attribute.String("kuma.entity", entity), attribute.Int("kuma.shard", shard)))
	defer span.End()
	if span.SpanContext().IsValid() {
		// The shardnode's span is the router's child: a copy of the
		// headers with the router's span context.
		fwd := make(nats.Header, len(hdr)+1)
		for k, v := range hdr {
			fwd[k] = v
		}
		telemetry.Inject(ctx, fwd)
		hdr = fwd
	}
	msg := &nats.Msg{
		Subject: kuma.ShardSubject(ctxName, shard, op, entity),
		Reply:   req.Reply(),
		Data:    req.Data(),
		Header:  hdr,
	}
	if err := s.nc.PublishMsg(msg); err != nil {
		s.fail(req, kuma.Errorf(kuma.CodeUnavailable, "router could not forward: %v", err))
		return
	}
	s.forwarded.Add(1)
}

func (s *Service) fail(req micro.Request, err error) {
	if rerr := natsbus.MicroError(req, err); rerr != nil {
		s.cfg.Logger.Warn("router reply failed", "err", rerr)
	}
}

// Forwarded returns how many requests this router forwarded.
func (s *Service) Forwarded() int64 { return s.forwarded.Load() }

// Stop deregisters the service; requests already forwarded are unaffected.
func (s *Service) Stop(ctx context.Context) error {
	if s.svc == nil {
		return nil
	}
	return s.svc.Stop()
}
