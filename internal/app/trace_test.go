package app_test

import (
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

func spansNamed(rec *tracetest.SpanRecorder, name string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if s.Name() == name {
			out = append(out, s)
		}
	}
	return out
}

// TestOneTraceFromCallerToCommit sends an append as a raw NATS request with
// a traceparent header (as a client in any language would): the router's
// span is the caller's child, the shardnode's the router's, and the group
// commit links to the shardnode's span.
func TestOneTraceFromCallerToCommit(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	n := kumatest.Start(t, func(c *app.Config) { c.TracerProvider = tp })

	const traceID, parentID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	msg := nats.NewMsg("kuma.default.append.traced-1")
	// Mixed case on purpose: the header is read case-insensitively.
	msg.Header["Traceparent"] = []string{"00-" + traceID + "-" + parentID + "-01"}
	msg.Data = []byte(`{"events":[{"type":"Created","data":{"a":1}}]}`)
	reply, err := n.NC.RequestMsg(msg, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ar kuma.AppendReply
	wantOK(t, reply, &ar)

	var router, shardnode, commit sdktrace.ReadOnlySpan
	deadline := time.Now().Add(5 * time.Second)
	for router == nil || shardnode == nil || commit == nil {
		if time.Now().After(deadline) {
			t.Fatalf("spans: router %v shardnode %v commit %v", router != nil, shardnode != nil, commit != nil)
		}
		time.Sleep(10 * time.Millisecond)
		for _, s := range spansNamed(rec, "kuma.router forward") {
			router = s
		}
		for _, s := range spansNamed(rec, "kuma.shardnode append") {
			shardnode = s
		}
		for _, s := range spansNamed(rec, "kuma.commit") {
			commit = s
		}
	}
	if got := router.SpanContext().TraceID().String(); got != traceID {
		t.Fatalf("router span in trace %s, want the caller's %s", got, traceID)
	}
	if got := router.Parent().SpanID().String(); got != parentID {
		t.Fatalf("router span's parent %s, want the caller's span %s", got, parentID)
	}
	if shardnode.SpanContext().TraceID().String() != traceID || shardnode.Parent().SpanID() != router.SpanContext().SpanID() {
		t.Fatalf("shardnode span %v is not the router's child", shardnode.Parent())
	}
	linked := false
	for _, l := range commit.Links() {
		linked = linked || l.SpanContext.SpanID() == shardnode.SpanContext().SpanID()
	}
	if !linked {
		t.Fatalf("the commit span does not link to the request's span")
	}
	attrs := map[string]bool{}
	for _, a := range commit.Attributes() {
		attrs[string(a.Key)] = true
	}
	if !attrs["kuma.commit.events"] || !attrs["kuma.commit.fsync_ms"] {
		t.Fatalf("commit span attributes %v lack batch size or fsync time", commit.Attributes())
	}
	// A new entity fetched its key from the keyvault, in the same trace.
	kv := spansNamed(rec, "kuma.keyvault DataKey")
	if len(kv) == 0 || kv[0].SpanContext().TraceID().String() != traceID {
		t.Fatalf("no keyvault span in the caller's trace")
	}

	// Past the commit: the relay's publish continues the caller's trace,
	// the projector's apply is its child (the context rides in the stream
	// message's headers and the Watermill metadata), and a query that
	// waited for the append's position links to that apply.
	q := nats.NewMsg("kuma.default.query.entities")
	q.Data = []byte(`{"after":"` + ar.Position + `"}`)
	if _, err := n.NC.RequestMsg(q, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	var relay, apply, query sdktrace.ReadOnlySpan
	for relay == nil || apply == nil || query == nil {
		if time.Now().After(deadline) {
			t.Fatalf("spans: relay %v apply %v query %v", relay != nil, apply != nil, query != nil)
		}
		time.Sleep(10 * time.Millisecond)
		for _, s := range spansNamed(rec, "kuma.relay publish") {
			if s.SpanContext().TraceID().String() == traceID {
				relay = s
			}
		}
		for _, s := range spansNamed(rec, "kuma.projector apply") {
			if relay != nil && s.Parent().SpanID() == relay.SpanContext().SpanID() {
				apply = s
			}
		}
		query = nil
		for _, s := range spansNamed(rec, "kuma.projector query entities") {
			query = s
		}
	}
	if relay.Parent().SpanID() != shardnode.SpanContext().SpanID() {
		t.Fatalf("the relay span's parent is %s, want the shardnode's span", relay.Parent().SpanID())
	}
	if apply.SpanContext().TraceID().String() != traceID {
		t.Fatalf("the projector's apply is not in the caller's trace")
	}
	joined := false
	for _, l := range query.Links() {
		joined = joined || l.SpanContext.SpanID() == apply.SpanContext().SpanID()
	}
	if !joined {
		t.Fatalf("the query span does not link to the apply of the position it waited for")
	}
}

// TestGoClientStartsTheTrace: with a tracer, the Go client's span is the
// root the server's spans hang from.
func TestGoClientStartsTheTrace(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	n := kumatest.Start(t, func(c *app.Config) { c.TracerProvider = tp })
	c := n.Client(client.Options{TracerProvider: tp})
	if _, err := c.Append(t.Context(), "traced-2", []kuma.EventInput{{Type: "E"}}); err != nil {
		t.Fatal(err)
	}
	var root trace.SpanContext
	for _, s := range spansNamed(rec, "kuma append") {
		root = s.SpanContext()
	}
	if !root.IsValid() {
		t.Fatal("no client span")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, s := range spansNamed(rec, "kuma.router forward") {
			if s.SpanContext().TraceID() == root.TraceID() && s.Parent().SpanID() == root.SpanID() {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the router's span is not the client span's child")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
