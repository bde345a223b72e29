package projector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// handle is the feed's handler: one stream message, applied in one
// transaction with the positions it reaches.
func (g *generation) handle(msg *streamMessage) error {
	svc := g.p.svc
	ctx := telemetry.Extract(msg.ctx, traceHeader(msg.header))
	ctx, span := svc.tracer.Start(ctx, "kuma.projector apply", trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.String("kuma.projection", g.p.name), attribute.Int64("kuma.generation", g.gen)))
	defer span.End()

	b, err := g.decode(ctx, msg)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		return err
	}
	g.mu.Lock()
	if g.stopped && !g.retry && g.skip == "" {
		g.mu.Unlock()
		// Stopped: give the message back (redelivered after the nack
		// delay) without an error, which would be logged each time;
		// status shows why.
		return errGiveBack
	}
	if g.skip != "" {
		b.skip = map[string]skipNote{g.skip: g.skipNote}
	}
	g.mu.Unlock()

	b.span = span.SpanContext()
	// An owner's epoch claim carries nothing to apply; the fault tests'
	// points are about events and notices.
	work := len(b.events) > 0 || b.forget != "" || b.forgetPseudonym != ""
	if work {
		svc.cfg.Failpoint("projector-before-apply")
	}
	start := time.Now()
	err = g.rm.apply(ctx, b, svc.cfg.Now())
	svc.metrics.applySeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
		g.fail(err)
		return err
	}
	if work {
		svc.cfg.Failpoint("projector-after-apply")
	}
	span.SetAttributes(attribute.Int("kuma.events", len(b.events)))
	svc.metrics.applied.WithLabelValues(g.p.name).Add(float64(len(b.events)))
	g.mu.Lock()
	if g.failure != nil {
		svc.log.Info("projection moves on", "projection", g.p.name, "generation", g.gen, "after", g.failure.Message)
	}
	g.failure, g.stopped, g.retry, g.skip = nil, false, false, ""
	g.mu.Unlock()
	g.p.applied(g)
	return nil
}

// fail records why a message did not apply: a failed event stops the
// projection there until an operator acts; anything else is retried.
func (g *generation) fail(err error) {
	now := g.p.svc.cfg.Now().UTC()
	g.mu.Lock()
	defer g.mu.Unlock()
	var ae *applyError
	if errors.As(err, &ae) {
		first := !g.stopped || g.failure == nil || g.failure.Position != ae.event.Position
		g.stopped, g.retry, g.skip = true, false, ""
		g.failure = &kuma.ProjectionError{Position: ae.event.Position, EventType: ae.event.Type,
			Entity: ae.event.Entity, Message: ae.err.Error(), Since: now}
		g.skipNote = skipNote{entity: ae.event.Entity, eventType: ae.event.Type, err: ae.err.Error()}
		if first {
			g.p.svc.log.Error("projection stopped at an event; retry or skip it", "projection", g.p.name,
				"generation", g.gen, "position", ae.event.Position, "type", ae.event.Type, "err", ae.err)
		}
		return
	}
	if g.failure == nil || g.failure.Message != err.Error() {
		g.p.svc.log.Warn("projection apply failed; retrying", "projection", g.p.name, "err", err)
		g.failure = &kuma.ProjectionError{Message: err.Error(), Since: now}
	}
}

// decode reads a stream message into a batch, opening every payload. An
// event of a forgotten entity is left out: its key is gone, and its notice
// (or an earlier one) removes whatever the read model held of it.
func (g *generation) decode(ctx context.Context, msg *streamMessage) (*batch, error) {
	svc := g.p.svc
	if !msg.hasSeq {
		return nil, fmt.Errorf("projector: message without a stream sequence")
	}
	seq := msg.seq
	b := &batch{streamSeq: seq}
	if strings.HasSuffix(msg.subject, ".forgotten") {
		var n kuma.ForgottenNotice
		if err := json.Unmarshal(msg.payload, &n); err != nil || (n.Entity == "") == (n.Pseudonym == "") {
			return nil, fmt.Errorf("projector: malformed forget notice at stream sequence %d", seq)
		}
		b.shard = n.Shard
		return b, g.confirmForget(ctx, b, n)
	}
	// The body is decoded by its format header. Format 2's payloads share
	// msg.payload; nothing keeps them past this message (Open returns a
	// new plaintext).
	var sm kuma.StreamMessage
	format, err := kuma.ParseStreamFormat(msg.header[kuma.HeaderFormat])
	if err == nil {
		err = kuma.DecodeStreamMessageFormat(format, msg.payload, &sm)
	}
	if err != nil {
		err = &rejectError{streamSeq: seq, reason: "its body is not a stream message: " + err.Error()}
	} else {
		err = verifyStreamMessage(svc.cfg.Context, seq, msg, &sm)
	}
	if rj := (*rejectError)(nil); errors.As(err, &rj) {
		// Not the relay's: nothing of it is applied, and the projection
		// stops at it (see readModel.apply).
		b.rejected = rj
		return b, nil
	}
	b.shard = sm.Shard
	b.events = make([]projection.Event, 0, len(sm.Events))
	for _, se := range sm.Events {
		p, err := kuma.ParsePosition(se.Position)
		if err != nil || p.Shard != sm.Shard {
			return nil, fmt.Errorf("projector: bad position %q at stream sequence %d", se.Position, seq)
		}
		b.lastSeq = p.Seq
		op, err := svc.keys.Open(ctx, svc.cfg.Context, se)
		if err != nil {
			return nil, err
		}
		if op.Forgotten {
			continue
		}
		if op.Pseudonym != "" && b.pseudonyms[op.Pseudonym] == "" {
			if b.pseudonyms == nil {
				b.pseudonyms = map[string]string{}
			}
			b.pseudonyms[op.Pseudonym] = op.Entity
		}
		b.events = append(b.events, projection.Event{Entity: op.Entity, Version: se.Version, Time: se.Time,
			Position: se.Position, Type: op.Type, Data: op.Data})
	}
	return b, nil
}

// confirmForget sets the batch's forget only if the keyvault confirms that
// the notice's entity is forgotten: anyone able to publish into the stream
// could write a notice, and a forged one must not drop a live entity. An
// unconfirmed notice is logged, counted, and applied as nothing.
func (g *generation) confirmForget(ctx context.Context, b *batch, n kuma.ForgottenNotice) error {
	svc := g.p.svc
	var rec *kuma.ForgetReply
	var err error
	if n.Pseudonym != "" {
		rec, err = svc.cfg.Keys.ForgottenPseudonym(ctx, svc.cfg.Context, n.Pseudonym)
	} else if kuma.ValidateEntityID(n.Entity) == nil {
		rec, err = svc.cfg.Keys.Forgotten(ctx, svc.cfg.Context, n.Entity) // a notice written before pseudonyms
	}
	if errors.Is(err, kuma.ErrBadRequest) {
		err = nil // a malformed pseudonym names no forgotten entity
	}
	if err != nil {
		return fmt.Errorf("projector: confirm a forget notice with the keyvault: %w", err)
	}
	if rec == nil {
		svc.metrics.ignoredNotices.Inc()
		svc.log.Warn("forget notice ignored: the keyvault says the entity is not forgotten (a forged notice?)",
			"projection", g.p.name, "stream_seq", b.streamSeq)
		return nil
	}
	b.forget, b.forgetPseudonym = n.Entity, n.Pseudonym
	return nil
}

// traceHeader exposes a message's trace headers to the propagator.
func traceHeader(h map[string]string) nats.Header {
	out := nats.Header{}
	for k, v := range h {
		if strings.EqualFold(k, "traceparent") || strings.EqualFold(k, "tracestate") {
			out[strings.ToLower(k)] = []string{v}
		}
	}
	return out
}
