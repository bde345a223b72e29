// Package telemetry is Kuma's OpenTelemetry glue: W3C trace context carried
// in NATS headers, the tracer provider a process exports with, and a slog
// handler that stamps trace and span ids on lines logged under a traced
// request. No maintained instrumentation exists for NATS in Go, so this is
// Kuma's own, small on purpose.
package telemetry

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// InstrumentationName names Kuma's tracers.
const InstrumentationName = "github.com/kumadb/kuma"

// Tracer returns Kuma's tracer from tp, or a no-op tracer when tp is nil:
// tracing off costs a nil check and an interface call, nothing more.
func Tracer(tp trace.TracerProvider) trace.Tracer {
	if tp == nil {
		return noop.NewTracerProvider().Tracer(InstrumentationName)
	}
	return tp.Tracer(InstrumentationName)
}

// HeaderCarrier carries W3C trace context in NATS headers. It writes
// lowercase keys (traceparent, tracestate) and reads them whatever their
// case, so clients in other languages interoperate.
type HeaderCarrier nats.Header

// Get returns the first value of key, matched case-insensitively.
func (h HeaderCarrier) Get(key string) string {
	if v, ok := h[key]; ok && len(v) > 0 {
		return v[0]
	}
	for k, v := range h {
		if strings.EqualFold(k, key) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// Set writes key in lowercase.
func (h HeaderCarrier) Set(key, value string) { h[strings.ToLower(key)] = []string{value} }

// Keys lists the header names.
func (h HeaderCarrier) Keys() []string {
	out := make([]string, 0, len(h))
	for k := range h {
		out = append(out, k)
	}
	return out
}

var propagator = propagation.TraceContext{}

// Inject writes ctx's span context into hdr (creating nothing when ctx has
// no span).
func Inject(ctx context.Context, hdr nats.Header) {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return
	}
	propagator.Inject(ctx, HeaderCarrier(hdr))
}

// Extract returns ctx with the remote span context found in hdr, if any.
func Extract(ctx context.Context, hdr nats.Header) context.Context {
	if len(hdr) == 0 {
		return ctx
	}
	return propagator.Extract(ctx, HeaderCarrier(hdr))
}

// Exporter says where spans go.
type Exporter string

// Exporters.
const (
	ExportNone   Exporter = ""       // tracing off
	ExportOTLP   Exporter = "otlp"   // OTLP over HTTP, configured by the standard OTEL_* variables
	ExportStdout Exporter = "stdout" // pretty JSON spans on a writer, for debugging
)

// NewProvider builds the process's tracer provider. Sampling follows the
// standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG variables (the SDK
// reads them; the default samples everything a parent does not decide).
// ExportNone returns nil, meaning no tracing.
func NewProvider(ctx context.Context, exp Exporter, out io.Writer, service string) (*sdktrace.TracerProvider, error) {
	var (
		e   sdktrace.SpanExporter
		err error
	)
	switch exp {
	case ExportNone:
		return nil, nil
	case ExportOTLP:
		e, err = otlptracehttp.New(ctx)
	case ExportStdout:
		e, err = stdouttrace.New(stdouttrace.WithWriter(out), stdouttrace.WithPrettyPrint())
	default:
		return nil, fmt.Errorf("telemetry: unknown exporter %q (want otlp or stdout)", exp)
	}
	if err != nil {
		return nil, fmt.Errorf("telemetry: %s exporter: %w", exp, err)
	}
	res := resource.NewSchemaless(semconv.ServiceName(service))
	return sdktrace.NewTracerProvider(sdktrace.WithBatcher(e), sdktrace.WithResource(res)), nil
}

// LogHandler wraps h so that every record logged with a context that holds
// a span carries trace_id and span_id.
func LogHandler(h slog.Handler) slog.Handler { return traceHandler{h} }

type traceHandler struct{ slog.Handler }

func (t traceHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return t.Handler.Handle(ctx, r)
}

func (t traceHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return traceHandler{t.Handler.WithAttrs(a)}
}
func (t traceHandler) WithGroup(n string) slog.Handler { return traceHandler{t.Handler.WithGroup(n)} }
