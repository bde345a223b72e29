package kumatest

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// StreamEvents waits until the context's stream holds at least want events,
// then reads every message and returns the events per entity in stream
// order. The stream names entities by pseudonym: each is resolved to its id
// through the keyvault (Entity is set); a forgotten entity's events are
// keyed by their pseudonym. It fails the test on anything a consumer must
// never see: a message on the wrong subject, an entity id in the clear,
// positions of a shard out of order or repeated, or a Kuma-Last-Position
// header that is not the last event's.
func StreamEvents(t testing.TB, nc *nats.Conn, kctx string, want int) map[string][]kuma.StreamEvent {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	names := &pseudonyms{vault: vaultclient.New(nc, 0), ids: map[string]string{}}
	for {
		out, n := readStream(t, ctx, js, kctx, names)
		if n >= want {
			return out
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the stream holds %d events, want %d", n, want)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// pseudonyms resolves the stream's pseudonyms to ids, remembering them.
type pseudonyms struct {
	vault *vaultclient.Client
	ids   map[string]string // pseudonym → id, or the pseudonym if forgotten
}

func (p *pseudonyms) resolve(t testing.TB, ctx context.Context, kctx string, e *kuma.StreamEvent) {
	t.Helper()
	if e.Pseudonym == "" {
		t.Fatalf("event %s names its entity %q in the clear, not by pseudonym", e.Position, e.Entity)
	}
	if id, ok := p.ids[e.Pseudonym]; ok {
		e.Entity = id
		return
	}
	r, err := p.vault.KeyByPseudonym(ctx, kctx, e.Pseudonym)
	switch {
	case kuma.ErrorCode(err) == kuma.CodeEntityForgotten:
		r.Entity = e.Pseudonym
	case err != nil:
		t.Fatalf("resolve the pseudonym of event %s: %v", e.Position, err)
	}
	p.ids[e.Pseudonym] = r.Entity
	e.Entity = r.Entity
}

func readStream(t testing.TB, ctx context.Context, js jetstream.JetStream, kctx string, names *pseudonyms) (map[string][]kuma.StreamEvent, int) {
	t.Helper()
	stream, err := js.Stream(ctx, kuma.StreamName(kctx))
	if err != nil {
		t.Fatal(err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]kuma.StreamEvent{}
	lastPos := map[int]int64{}
	n := 0
	if info.State.Msgs == 0 {
		return out, 0
	}
	// An ordered consumer streams the messages in order, far faster than a
	// get per sequence on a stream of a few hundred thousand messages.
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(1000))
	if err != nil {
		t.Fatal(err)
	}
	defer it.Stop()
	done := make(chan struct{})
	defer close(done)
	go func() { // Next does not take a ctx: stop the iterator when ctx ends
		select {
		case <-ctx.Done():
			it.Stop()
		case <-done:
		}
	}()
	for seq := uint64(0); seq < info.State.LastSeq; {
		jm, err := it.Next()
		if err != nil {
			t.Fatalf("read the stream at %d of %d: %v", seq, info.State.LastSeq, err)
		}
		md, err := jm.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		seq = md.Sequence.Stream
		m := struct {
			Subject string
			Header  nats.Header
		}{jm.Subject(), jm.Headers()}
		// Events messages in either format (by their header); forget
		// notices are JSON, with the shard too.
		var body kuma.StreamMessage
		format, err := kuma.ParseStreamFormat(m.Header.Get(kuma.HeaderFormat))
		if err == nil && format != kuma.StreamFormat1 {
			err = kuma.DecodeStreamMessageFormat(format, jm.Data(), &body)
		} else if err == nil {
			err = json.Unmarshal(jm.Data(), &body)
		}
		if err != nil {
			t.Fatalf("stream message %d: %v", seq, err)
		}
		if m.Subject == kuma.ForgottenSubject(kctx, body.Shard) {
			continue // a forget notice: no events, no position
		}
		if m.Header.Get(kuma.HeaderEpoch) != "" {
			// An owner's epoch claim: no events, and it says where the
			// shard stands, which must be what came before it.
			want := ""
			if lastPos[body.Shard] > 0 {
				want = kuma.Position{Shard: body.Shard, Seq: lastPos[body.Shard]}.String()
			}
			if len(body.Events) != 0 || m.Header.Get(kuma.HeaderLastPosition) != want {
				t.Fatalf("epoch claim on %s with %d events at %q, want none at %q", m.Subject, len(body.Events),
					m.Header.Get(kuma.HeaderLastPosition), want)
			}
			continue
		}
		if m.Subject != kuma.EventsSubject(kctx, body.Shard) || len(body.Events) == 0 {
			t.Fatalf("message for shard %d with %d events on %s", body.Shard, len(body.Events), m.Subject)
		}
		for _, e := range body.Events {
			p, err := kuma.ParsePosition(e.Position)
			if err != nil || p.Shard != body.Shard || p.Seq <= lastPos[p.Shard] {
				t.Fatalf("position %s after %d in shard %d: out of order or repeated", e.Position, lastPos[p.Shard], body.Shard)
			}
			lastPos[p.Shard] = p.Seq
			names.resolve(t, ctx, kctx, &e)
			out[e.Entity] = append(out[e.Entity], e)
			n++
		}
		if h := m.Header.Get(kuma.HeaderLastPosition); h != body.Events[len(body.Events)-1].Position {
			t.Fatalf("header %s = %q, want the last event's position", kuma.HeaderLastPosition, h)
		}
	}
	return out, n
}
