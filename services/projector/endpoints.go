package projector

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/trace"
)

// serve registers the NATS micro service "kuma-projector": queries, the
// admin subjects and the status part a shardnode includes in its answer.
func (s *Service) serve(ctx context.Context) error {
	svc, err := natsbus.AddService(s.nc, natsbus.ServiceConfig{
		Name: "kuma-projector", Version: Version,
		Description: "Read models from the event stream: queries, rebuilds",
		QueueGroup:  "kuma-projector",
	})
	if err != nil {
		return fmt.Errorf("projector: register micro service: %w", err)
	}
	s.micro = svc
	kctx := s.cfg.Context
	name := func(req micro.Request) string {
		subj := req.Subject()
		return subj[strings.LastIndexByte(subj, '.')+1:]
	}
	endpoints := []struct {
		name, subject string
		h             func(ctx context.Context, req micro.Request) (any, error)
	}{
		{"query", kuma.QuerySubject(kctx, "*"), func(ctx context.Context, req micro.Request) (any, error) {
			var r kuma.QueryRequest
			if err := kuma.Decode(req.Data(), &r); err != nil {
				return nil, err
			}
			return s.Query(ctx, name(req), &r)
		}},
		// Admin commands and status reach every replica (replicas.go).
		{"rebuild", kuma.ProjectionAdminSubject(kctx, "rebuild", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			if err := kuma.DecodeEmpty(req.Data()); err != nil {
				return nil, err
			}
			return s.RebuildAll(ctx, name(req))
		}},
		{"retry", kuma.ProjectionAdminSubject(kctx, "retry", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			if err := kuma.DecodeEmpty(req.Data()); err != nil {
				return nil, err
			}
			return s.RetryAll(ctx, name(req))
		}},
		{"skip", kuma.ProjectionAdminSubject(kctx, "skip", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			var r kuma.SkipRequest
			if err := kuma.Decode(req.Data(), &r); err != nil {
				return nil, err
			}
			return s.SkipAll(ctx, name(req), r.Position)
		}},
		{"drop", kuma.ProjectionAdminSubject(kctx, "drop", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			if err := kuma.DecodeEmpty(req.Data()); err != nil {
				return nil, err
			}
			return s.DropAll(ctx, name(req))
		}},
		{"status", kuma.ProjectorStatusSubject(kctx), func(ctx context.Context, req micro.Request) (any, error) {
			return s.StatusAll(ctx)
		}},
	}
	for _, op := range []string{"rebuild", "retry", "skip", "drop", "status"} {
		// Every replica, outside the queue group; natsbus.Service refuses
		// a reserved reply subject here as on every endpoint.
		err := svc.AddBroadcastEndpoint("replicas-"+op+"-"+kctx, kuma.ProjectorReplicasSubject(kctx, op), micro.HandlerFunc(func(req micro.Request) {
			ctx := telemetry.Extract(context.Background(), nats.Header(req.Headers()))
			ctx, cancel := context.WithTimeout(ctx, s.cfg.ReplicaAdminWait)
			defer cancel()
			var r replicaRequest
			var a replicaAnswer
			if err := json.Unmarshal(req.Data(), &r); err != nil {
				a = replicaAnswer{Node: s.cfg.NodeName, Error: kuma.Errorf(kuma.CodeBadRequest, "replica request: %v", err)}
			} else {
				a = s.replicaOp(ctx, op, &r)
			}
			body, _ := json.Marshal(a)
			code := "ok"
			if a.Error != nil {
				code = string(a.Error.Code)
			}
			s.metrics.requests.WithLabelValues("replicas-"+op, code).Inc()
			if err := req.Respond(body); err != nil {
				s.metrics.repliesFailed.WithLabelValues("replicas-"+op, string(natsbus.ReplyFailureCode(err))).Inc()
				s.log.Warn("projector reply failed", "subject", req.Subject(), "err", err)
			}
		}))
		if err != nil {
			return fmt.Errorf("projector: endpoint replicas-%s: %w", op, err)
		}
	}
	for _, e := range endpoints {
		name := e.name
		err := svc.AddEndpoint(name+"-"+kctx, e.subject, natsbus.JSONEndpoint{
			Answer:   e.h,
			Timeout:  kuma.MaxQueryWait*time.Millisecond + s.cfg.QueryTimeout + time.Second,
			MaxReply: s.maxReply,
			Hint:     "ask for fewer rows with limit",
			// Counted before the reply goes: whoever got a reply finds
			// it counted.
			Answered: func(req micro.Request, err error) {
				s.metrics.requests.WithLabelValues(name, natsbus.Code(err)).Inc()
				if err != nil {
					s.log.Debug("projector request failed", "subject", req.Subject(), "err", err)
				}
			},
			ReplyFailed: func(req micro.Request, err error) {
				s.metrics.repliesFailed.WithLabelValues(name, string(natsbus.ReplyFailureCode(err))).Inc()
				s.log.Warn("projector reply failed", "subject", req.Subject(), "err", err)
			},
		})
		if err != nil {
			return fmt.Errorf("projector: endpoint %s: %w", e.name, err)
		}
	}
	return natsbus.Flush(ctx, s.nc)
}

// Query answers a query, waiting first for r.After when given.
func (s *Service) Query(ctx context.Context, name string, r *kuma.QueryRequest) (*kuma.QueryReply, error) {
	p, err := s.projection(name)
	if err != nil {
		return nil, err
	}
	after, wait, err := r.Validate()
	if err != nil {
		return nil, err
	}
	ctx, span := s.tracer.Start(ctx, "kuma.projector query "+name, trace.WithSpanKind(trace.SpanKindServer))
	defer span.End()
	if after.Seq > 0 {
		if err := p.wait(ctx, after, wait); err != nil {
			// Each replica waits for its own copy: a replica far behind
			// times out where another would answer. The node says which;
			// a retry may reach another replica (timeout is retryable).
			if kerr := kuma.AsError(err); kerr.Code == kuma.CodeTimeout {
				kerr.Details = map[string]any{"node": s.cfg.NodeName}
				return nil, kerr
			}
			return nil, err
		}
		// The query joins the trace of the write it waited for, through
		// the apply that brought it in.
		if sc := p.appliedSpan(after.Shard); sc.IsValid() {
			span.AddLink(trace.Link{SpanContext: sc})
		}
	}
	qctx, cancel := context.WithTimeout(ctx, s.cfg.QueryTimeout)
	defer cancel()
	return p.query(qctx, r, s.maxReply)
}

// Rebuild starts a rebuild of one projection and returns at once.
func (s *Service) Rebuild(ctx context.Context, name string) (*kuma.RebuildReply, error) {
	p, err := s.projection(name)
	if err != nil {
		return nil, err
	}
	return p.rebuild(ctx)
}

// Retry makes a projection stopped at a failed event try it again.
func (s *Service) Retry(name string) error {
	p, err := s.projection(name)
	if err != nil {
		return err
	}
	return p.act("retry", "")
}

// Skip makes a projection stopped at the event at position skip it; the
// skip is recorded in the read model (_kuma_skipped) and counted in status.
func (s *Service) Skip(name, position string) error {
	p, err := s.projection(name)
	if err != nil {
		return err
	}
	if position != forgetPosition && !isRejectedPosition(position) {
		if _, err := kuma.ParsePosition(position); err != nil {
			return err
		}
	}
	return p.act("skip", position)
}

// Status reports every projection, in name order.
func (s *Service) Status(ctx context.Context) ([]kuma.ProjectionStatus, error) {
	var last uint64
	if st, err := s.stream(ctx); err == nil {
		if info, err := st.Info(ctx); err == nil {
			last = info.State.LastSeq
		}
	}
	out := []kuma.ProjectionStatus{}
	for _, p := range s.projections() {
		out = append(out, p.status(last))
	}
	return out, nil
}
