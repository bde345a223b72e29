package shardnode

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace/noop"
)

// fakeStream is an in-memory event stream with JetStream's two rules the
// relay leans on: a message id already stored is answered with the first
// message's sequence, and otherwise a publish must expect the subject's
// last sequence. fail makes the next publishes fail; with land set they
// are stored first (an ack lost on its way back).
type fakeStream struct {
	mu   sync.Mutex
	msgs []*jetstream.RawStreamMsg // sequence i+1
	ids  map[string]uint64
	fail int
	land bool
	sent int // publish attempts
}

var errPublishTimeout = errors.New("nats: timeout")

func newFakeStream() *fakeStream { return &fakeStream{ids: map[string]uint64{}} }

func (f *fakeStream) lastSeqLocked(subject string) uint64 {
	for i := len(f.msgs) - 1; i >= 0; i-- {
		if f.msgs[i].Subject == subject {
			return f.msgs[i].Sequence
		}
	}
	return 0
}

func (f *fakeStream) storeLocked(msg *nats.Msg, id string) uint64 {
	h := nats.Header{}
	for k, v := range msg.Header {
		h[k] = append([]string(nil), v...)
	}
	seq := uint64(len(f.msgs) + 1)
	f.msgs = append(f.msgs, &jetstream.RawStreamMsg{Subject: msg.Subject, Sequence: seq, Header: h, Data: bytes.Clone(msg.Data)})
	if id != "" {
		f.ids[id] = seq
	}
	return seq
}

func (f *fakeStream) publish(_ context.Context, msg *nats.Msg, id string, lastSeq uint64) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent++
	if seq, ok := f.ids[id]; ok {
		return seq, nil
	}
	if f.fail > 0 {
		f.fail--
		if f.land && f.lastSeqLocked(msg.Subject) == lastSeq {
			f.storeLocked(msg, id)
		}
		return 0, errPublishTimeout
	}
	if got := f.lastSeqLocked(msg.Subject); got != lastSeq {
		return 0, &jetstream.APIError{ErrorCode: jetstream.JSErrCodeStreamWrongLastSequence, Description: fmt.Sprintf("wrong last sequence: %d", got)}
	}
	return f.storeLocked(msg, id), nil
}

func (f *fakeStream) announce(_ context.Context, msg *nats.Msg, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.ids[id]; !ok {
		f.storeLocked(msg, id)
	}
	return nil
}

func (f *fakeStream) last(_ context.Context, subject string) (*jetstream.RawStreamMsg, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if seq := f.lastSeqLocked(subject); seq > 0 {
		return f.msgs[seq-1], nil
	}
	return nil, jetstream.ErrMsgNotFound
}

// positions lists the positions of the events in the subject's messages,
// in stream order, and the messages' sizes.
func (f *fakeStream) positions(t *testing.T, subject string) (pos []int64, sizes []int) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range f.msgs {
		if m.Subject != subject || m.Header.Get(kuma.HeaderEpoch) != "" {
			continue
		}
		var body kuma.StreamMessage
		format, err := kuma.ParseStreamFormat(m.Header.Get(kuma.HeaderFormat))
		if err != nil {
			t.Fatal(err)
		}
		if err := kuma.DecodeStreamMessageFormat(format, m.Data, &body); err != nil {
			t.Fatal(err)
		}
		for _, e := range body.Events {
			p, err := kuma.ParsePosition(e.Position)
			if err != nil {
				t.Fatal(err)
			}
			pos = append(pos, p.Seq)
		}
		if last, err := kuma.ParsePosition(m.Header.Get(kuma.HeaderLastPosition)); err != nil || len(pos) == 0 || last.Seq != pos[len(pos)-1] {
			t.Fatalf("message %d: %s header %q, its last event at %v", m.Sequence, kuma.HeaderLastPosition, m.Header.Get(kuma.HeaderLastPosition), pos)
		}
		sizes = append(sizes, len(m.Data))
	}
	return pos, sizes
}

// pseudonyms names every entity "p-<id>", except those forgotten.
type pseudonyms struct{ forgotten map[string]bool }

func (p pseudonyms) Entry(_ context.Context, _, entity string, _ bool) (keycache.Entry, error) {
	if p.forgotten[entity] {
		return keycache.Entry{}, kuma.ErrEntityForgotten
	}
	return keycache.Entry{Entity: entity, Pseudonym: "p-" + entity}, nil
}

type relayHarness struct {
	store  *sqlite.Shard
	stream *fakeStream
	relay  *relay
	mu     sync.Mutex
	lost   []string
}

func newRelayHarness(t *testing.T, maxPayload int64, forgotten ...string) *relayHarness {
	t.Helper()
	store, err := sqlite.Open(t.Context(), sqlite.Config{Path: filepath.Join(t.TempDir(), "shard-00.db"), Context: "test", Shard: 0, Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	h := &relayHarness{store: store, stream: newFakeStream()}
	gone := map[string]bool{}
	for _, id := range forgotten {
		gone[id] = true
	}
	h.relay = newRelay(relayDeps{
		kctx: "test", n: 0, stream: h.stream, outbox: store, keys: pseudonyms{gone},
		gone: context.Background(),
		lost: func(why string) {
			h.mu.Lock()
			h.lost = append(h.lost, why)
			h.mu.Unlock()
		},
		maxPayload: func() int64 { return maxPayload },
		logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		tracer:     noop.NewTracerProvider().Tracer(""),
		failpoint:  func(string) {},
	})
	return h
}

// commit stores one event of size bytes for each entity, in order.
func (h *relayHarness) commit(t *testing.T, size int, entities ...string) {
	t.Helper()
	for _, id := range entities {
		rec, ok, err := h.store.Entity(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		v := rec.Version + 1
		now := time.Now().UTC().Truncate(time.Microsecond)
		c := &sqlite.Commit{Entity: id, Events: []sqlite.EventRow{{Version: v, Payload: bytes.Repeat([]byte{'x'}, size), Time: now}}, CreatedAt: now}
		if ok {
			c.CreatedAt = rec.CreatedAt
		}
		if err := h.store.Commit(t.Context(), c); err != nil {
			t.Fatal(err)
		}
	}
}

// drain calls publishOnce until it publishes nothing more.
func (h *relayHarness) drain(t *testing.T) {
	t.Helper()
	for i := 0; ; i++ {
		n, err := h.relay.publishOnce()
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		if n == 0 {
			return
		}
	}
}

func seqs(n int) string {
	out := make([]int64, n)
	for i := range out {
		out[i] = int64(i + 1)
	}
	return fmt.Sprint(out)
}

// TestRelayBatchesInOrderWithinTheMaxPayload: the committed events go out
// in commit order, each once, many to a message but never more than the
// server's max payload (less the header room) allows.
func TestRelayBatchesInOrderWithinTheMaxPayload(t *testing.T) {
	const maxPayload = 16 << 10
	for _, format := range []int{kuma.StreamFormat1, kuma.StreamFormat2} {
		t.Run(fmt.Sprint("format ", format), func(t *testing.T) {
			h := newRelayHarness(t, maxPayload)
			h.relay.format = func() int { return format }
			ids := make([]string, 40)
			for i := range ids {
				ids[i] = fmt.Sprintf("e%d", i%7)
			}
			h.commit(t, 1000, ids...) // ~1.6 KB each once in base64 and JSON: ~9 a message
			h.drain(t)
			pos, sizes := h.stream.positions(t, h.relay.subject)
			if got, want := fmt.Sprint(pos), seqs(40); got != want {
				t.Fatalf("positions in the stream:\n got %s\nwant %s", got, want)
			}
			if len(sizes) < 3 {
				t.Fatalf("40 events of 1 KB in %d messages under a %d-byte max payload", len(sizes), maxPayload)
			}
			for i, s := range sizes {
				if s > maxPayload-relayHeaderRoom {
					t.Fatalf("message %d is %d bytes, past %d", i, s, maxPayload-relayHeaderRoom)
				}
			}
			if got := h.relay.published.Load(); got != 40 {
				t.Fatalf("published: got %d, want 40", got)
			}
			for _, m := range h.stream.msgs {
				if got, want := m.Header.Get(kuma.HeaderFormat), map[int]string{1: "", 2: "2"}[format]; m.Header.Get(kuma.HeaderEpoch) == "" && got != want {
					t.Fatalf("header %s: got %q, want %q", kuma.HeaderFormat, got, want)
				}
			}
		})
	}
	// The relay's own limit holds when the server allows more.
	if got := (&relay{relayDeps: relayDeps{maxPayload: func() int64 { return 8 << 20 }}}).maxBytes(); got != relayMaxBytes {
		t.Fatalf("max bytes under an 8 MB max payload: got %d, want %d", got, relayMaxBytes)
	}
}

// TestRelayRetriesAFailedPublish: publishes that fail are tried again
// until the stream takes them, and waiting appends are let go once it has;
// a failure whose message landed (its ack lost) is sent again as the very
// same batch, so nothing is stored twice, even with more committed since.
func TestRelayRetriesAFailedPublish(t *testing.T) {
	for _, land := range []bool{false, true} {
		t.Run(fmt.Sprintf("landed=%v", land), func(t *testing.T) {
			h := newRelayHarness(t, 1<<20)
			h.commit(t, 10, "a", "b", "a")
			h.stream.fail, h.stream.land = 2, land
			if _, err := h.relay.publishOnce(); !errors.Is(err, errPublishTimeout) {
				t.Fatalf("first publish: got %v, want the stream's timeout", err)
			}
			h.commit(t, 10, "c", "c") // committed while the outcome is unknown
			waited := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				waited <- h.relay.waitPublished(ctx, 5)
			}()
			h.relay.start()
			defer h.relay.close(context.Background())
			if err := <-waited; err != nil {
				t.Fatalf("an append waiting for position 5: %v", err)
			}
			pos, sizes := h.stream.positions(t, h.relay.subject)
			if got, want := fmt.Sprint(pos), seqs(5); got != want {
				t.Fatalf("positions in the stream:\n got %s\nwant %s", got, want)
			}
			if land && len(sizes) != 2 {
				t.Fatalf("after a lost ack: %d messages, want the first batch (3 events) and then the rest", len(sizes))
			}
			if len(h.lost) > 0 {
				t.Fatalf("the relay gave the shard up: %v", h.lost)
			}
		})
	}
}

// TestRelayFencedByAnotherOwner: once another owner has published on the
// shard's subject (its epoch claim), the relay's compare-and-set fails and
// the message there is not its own: it stops, tells the shard (lost), and
// appends that wait for the stream are answered unavailable.
func TestRelayFencedByAnotherOwner(t *testing.T) {
	h := newRelayHarness(t, 1<<20)
	if err := h.relay.claim(t.Context(), 3, 0); err != nil {
		t.Fatal(err)
	}
	h.commit(t, 10, "a")
	h.drain(t)
	// A newer owner claims the shard behind this one's back.
	other := newRelay(relayDeps{kctx: "test", n: 0, stream: h.stream})
	other.subjSeq.Store(h.relay.subjSeq.Load())
	if err := other.claim(t.Context(), 4, 1); err != nil {
		t.Fatal(err)
	}
	h.commit(t, 10, "a")
	// An append already waiting for the stream when the fence comes is
	// answered by it, not left to its own time limit.
	waiting := make(chan error, 1)
	go func() {
		wctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		waiting <- h.relay.waitPublished(wctx, 2)
	}()
	h.relay.start()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for {
		h.mu.Lock()
		lost := fmt.Sprint(h.lost)
		h.mu.Unlock()
		if lost == "[fenced by the stream]" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the shard was not told it is lost: %s", lost)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := <-waiting; kuma.ErrorCode(err) != kuma.CodeUnavailable {
		t.Fatalf("an append waiting when the relay was fenced: got %v, want unavailable", err)
	}
	// And one that waits for the stream from now on is answered at once.
	if err := h.relay.waitPublished(ctx, 2); kuma.ErrorCode(err) != kuma.CodeUnavailable {
		t.Fatalf("an append waiting on a fenced relay: got %v, want unavailable", err)
	}
	h.relay.close(context.Background())
	if pos, _ := h.stream.positions(t, h.relay.subject); fmt.Sprint(pos) != "[1]" {
		t.Fatalf("positions in the stream after the fence: got %v, want [1]", pos)
	}
}

// TestRelaySkipsForgottenEntities: events of an entity forgotten since
// they were committed are never published, and the position moves past
// them.
func TestRelaySkipsForgottenEntities(t *testing.T) {
	h := newRelayHarness(t, 1<<20, "gone")
	h.commit(t, 10, "a", "gone", "gone", "b", "gone")
	h.drain(t)
	if pos, _ := h.stream.positions(t, h.relay.subject); fmt.Sprint(pos) != "[1 4]" {
		t.Fatalf("positions in the stream: got %v, want [1 4]", pos)
	}
	if got := h.relay.published.Load(); got != 5 {
		t.Fatalf("published: got %d, want 5 (past the forgotten entity's events)", got)
	}
}
