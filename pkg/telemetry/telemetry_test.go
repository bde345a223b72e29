package telemetry

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"testing"

	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

func TestCarrierWritesLowercaseAndReadsAnyCase(t *testing.T) {
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("t").Start(context.Background(), "s")
	defer span.End()
	hdr := nats.Header{}
	Inject(ctx, hdr)
	if len(hdr["traceparent"]) != 1 {
		t.Fatalf("headers %v, want a lowercase traceparent", hdr)
	}
	for _, key := range []string{"traceparent", "Traceparent", "TRACEPARENT"} {
		h := nats.Header{key: hdr["traceparent"]}
		got := trace.SpanContextFromContext(Extract(context.Background(), h))
		if got.TraceID() != span.SpanContext().TraceID() || !got.IsRemote() {
			t.Fatalf("%s: extracted %v, want the injected trace", key, got)
		}
	}
	// Nothing is injected without a span, and a garbage header is ignored.
	empty := nats.Header{}
	Inject(context.Background(), empty)
	if len(empty) != 0 {
		t.Fatalf("injected %v without a span", empty)
	}
	if sc := trace.SpanContextFromContext(Extract(context.Background(), nats.Header{"traceparent": {"nonsense"}})); sc.IsValid() {
		t.Fatal("a malformed traceparent produced a span context")
	}
}

func TestLogHandlerStampsTraceIDs(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(LogHandler(slog.NewJSONHandler(&buf, nil)))
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("t").Start(context.Background(), "s")
	log.InfoContext(ctx, "traced")
	span.End()
	log.Info("untraced")
	dec := json.NewDecoder(&buf)
	var first, second map[string]any
	if err := dec.Decode(&first); err != nil {
		t.Fatal(err)
	}
	if err := dec.Decode(&second); err != nil {
		t.Fatal(err)
	}
	if first["trace_id"] != span.SpanContext().TraceID().String() || first["span_id"] != span.SpanContext().SpanID().String() {
		t.Fatalf("traced line %v lacks the ids", first)
	}
	if _, ok := second["trace_id"]; ok {
		t.Fatalf("untraced line %v has a trace id", second)
	}
}

func TestTracerOffIsNoop(t *testing.T) {
	_, span := Tracer(nil).Start(context.Background(), "s")
	if span.SpanContext().IsValid() || span.IsRecording() {
		t.Fatal("tracing off produced a real span")
	}
}
