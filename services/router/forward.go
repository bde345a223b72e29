package router

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// pending is a forwarded request waiting for its shardnode's answer.
type pending struct {
	reply string    // the client's reply subject
	msg   *nats.Msg // what was sent, to send again while nobody answers
	first time.Time // first sent (monotonic)
	tries int
	span  trace.Span
}

// forward sends the request on to its shard. The answer comes back to the
// router's inbox (onAnswer), which relays it to the client. A request
// whose reply subject is reserved never gets here: the service drops it.
func (s *Service) forward(req micro.Request) {
	ctxName, op, entity, ok := kuma.ParseEntitySubject(req.Subject())
	if !ok {
		s.fail(req, kuma.Errorf(kuma.CodeBadRequest, "subject %q is not kuma.<ctx>.<op>.<entity>", req.Subject()))
		return
	}
	if err := kuma.ValidateEntityID(entity); err != nil {
		s.fail(req, err)
		return
	}
	shards, ok, err := s.counts.of(context.Background(), ctxName)
	if !ok {
		s.fail(req, kuma.Errorf(kuma.CodeNotFound, "context %q is not served here", ctxName))
		return
	}
	if err != nil {
		s.fail(req, err)
		return
	}
	shard := placement.ShardOf(entity, shards)
	hdr := nats.Header(req.Headers())
	ctx, span := s.tracer.Start(telemetry.Extract(context.Background(), hdr), "kuma.router forward",
		trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("kuma.op", op), attribute.String("kuma.entity", entity), attribute.Int("kuma.shard", shard)))
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
	msg := &nats.Msg{Subject: kuma.ShardSubject(ctxName, shard, op, entity), Data: req.Data(), Header: hdr}
	if req.Reply() == "" {
		// A plain publish: nobody waits for an answer.
		defer span.End()
		if err := s.nc.PublishMsg(msg); err != nil {
			s.cfg.Logger.Warn("router could not forward", "subject", msg.Subject, "err", err)
			return
		}
		s.forwarded.Add(1)
		return
	}
	p := &pending{reply: req.Reply(), msg: msg, first: time.Now(), span: span}
	token := strconv.FormatUint(s.token.Add(1), 36)
	msg.Reply = s.inbox + "." + token
	s.mu.Lock()
	if s.closed || len(s.wait) >= s.cfg.MaxPending {
		closed := s.closed
		s.mu.Unlock()
		span.End()
		s.unavailable.Add(1)
		why := "router is stopping"
		if !closed {
			why = fmt.Sprintf("router has %d requests waiting for their shards", s.cfg.MaxPending)
		}
		s.fail(req, kuma.Errorf(kuma.CodeUnavailable, "%s; retry", why))
		return
	}
	s.wait[token] = p
	s.mu.Unlock()
	if err := s.nc.PublishMsg(msg); err != nil {
		s.take(token)
		span.End()
		s.fail(req, kuma.Errorf(kuma.CodeUnavailable, "router could not forward: %v", err))
		return
	}
	s.forwarded.Add(1)
}

// onAnswer relays a shardnode's answer to the client, or, when NATS says
// nobody was subscribed to the shard, sends the request again a little
// later until HoldFor has passed.
func (s *Service) onAnswer(m *nats.Msg) {
	token := m.Subject[len(s.inbox)+1:]
	// Nobody subscribed (NATS's own 503), or the owner answered
	// unavailable (it is handing the shard off and did not do the work):
	// either way the request may be sent again.
	if m.Header.Get("Status") == "503" && len(m.Data) == 0 || m.Header.Get(natsbus.HeaderErrorCode) == "503" {
		s.noOwner(token, m)
		return
	}
	p := s.take(token)
	if p == nil {
		return // answered already, or given up on
	}
	defer p.span.End()
	out := &nats.Msg{Subject: p.reply, Header: m.Header, Data: m.Data}
	if err := s.nc.PublishMsg(out); err != nil {
		// The same bytes reached this connection, so only a server with
		// a smaller max payload than the shardnode's (members configured
		// apart) or a closing connection refuses them. The client is told
		// rather than left to wait out its timeout.
		s.relayFailed.Add(1)
		s.cfg.Logger.Warn("router could not relay an answer", "subject", p.msg.Subject, "err", err)
		why := kuma.Errorf(kuma.CodeInternal, "the router could not relay the answer")
		if natsbus.ReplyFailureCode(err) == kuma.CodePayloadTooLarge {
			why = natsbus.TooLarge(len(m.Data), int(s.nc.MaxPayload()), "the answer to "+p.msg.Subject,
				"the router's NATS server has a smaller max_payload than the shardnode's: give every server of the cluster the same")
		}
		s.answer(p.reply, why)
	}
}

// noOwner handles a request no owner took: its shard is between owners. The
// last answer is relayed when the hold time is over (an owner's own
// unavailable says more than the router's).
func (s *Service) noOwner(token string, last *nats.Msg) {
	s.mu.Lock()
	p := s.wait[token]
	if p == nil {
		s.mu.Unlock()
		return
	}
	elapsed := time.Since(p.first)
	if elapsed >= s.cfg.HoldFor || s.closed {
		delete(s.wait, token)
		s.mu.Unlock()
		s.unavailable.Add(1)
		p.span.AddEvent("no owner answered", trace.WithAttributes(attribute.Int("kuma.tries", p.tries+1)))
		p.span.End()
		if len(last.Data) > 0 {
			if err := s.nc.PublishMsg(&nats.Msg{Subject: p.reply, Header: last.Header, Data: last.Data}); err != nil {
				s.cfg.Logger.Warn("router reply failed", "err", err)
			}
			return
		}
		s.answer(p.reply, kuma.Errorf(kuma.CodeUnavailable,
			"%s has no owner answering after %s (the shard is moving, or its node is down); retry with the same idempotency key",
			p.msg.Subject, elapsed.Round(time.Millisecond)))
		return
	}
	p.tries++
	// 5, 10, 20, 40 ms, then every 50 ms: a live move leaves a gap of a
	// few hundred milliseconds.
	delay := min(5*time.Millisecond<<min(p.tries-1, 4), 50*time.Millisecond)
	s.mu.Unlock()
	s.held.Add(1)
	time.AfterFunc(delay, func() {
		s.mu.Lock()
		still := s.wait[token] == p
		s.mu.Unlock()
		if !still {
			return
		}
		if err := s.nc.PublishMsg(p.msg); err != nil && s.take(token) != nil {
			p.span.End()
			s.answer(p.reply, kuma.Errorf(kuma.CodeUnavailable, "router could not forward: %v", err))
		}
	})
}

// take removes and returns a waiting request (nil when it is not waiting).
func (s *Service) take(token string) *pending {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.wait[token]
	delete(s.wait, token)
	return p
}

// answer sends a protocol error to a client's reply subject.
func (s *Service) answer(reply string, err error) {
	if perr := s.nc.PublishMsg(natsbus.ErrorMsg(reply, err)); perr != nil {
		s.cfg.Logger.Warn("router reply failed", "err", perr)
	}
}

// sweepLoop forgets requests whose shardnode never answered.
func (s *Service) sweepLoop() {
	defer s.swept.Done()
	t := time.NewTicker(max(s.cfg.MaxWait/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-s.sweep:
			return
		case <-t.C:
		}
		var gone []*pending
		s.mu.Lock()
		for token, p := range s.wait {
			if time.Since(p.first) > s.cfg.MaxWait {
				delete(s.wait, token)
				gone = append(gone, p)
			}
		}
		s.mu.Unlock()
		for _, p := range gone {
			s.dropped.Add(1)
			p.span.AddEvent("no answer from the shardnode")
			p.span.End()
		}
	}
}

func (s *Service) fail(req micro.Request, err error) {
	if rerr := natsbus.MicroError(req, err); rerr != nil {
		s.cfg.Logger.Warn("router reply failed", "err", rerr)
	}
}
