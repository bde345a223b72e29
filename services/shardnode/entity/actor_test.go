package entity_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/testkit"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/services/shardnode/entity"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace/noop"
)

// vault is an in-memory key source: real envelope keys, made here, one
// per entity. It is both entity.Keys and entity.Vault, which are two
// methods; everything else of the keyvault stays out of the actor.
type vault struct {
	mu        sync.Mutex
	keys      map[string]*envelope.Key
	forgotten map[string]*kuma.ForgetReply
}

func (v *vault) Get(_ context.Context, _, id string, create bool) (*envelope.Key, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.forgotten[id] != nil {
		return nil, kuma.ErrEntityForgotten
	}
	if k := v.keys[id]; k != nil {
		return k, nil
	}
	if !create {
		return nil, kuma.ErrNotFound
	}
	k, err := envelope.NewKey(envelope.NewRandomKey())
	if err != nil {
		return nil, err
	}
	v.keys[id] = k
	return k, nil
}

func (v *vault) Forgotten(_ context.Context, _, id string) (*kuma.ForgetReply, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.forgotten[id], nil
}

// shred is the vault's half of an erase: the key goes.
func (v *vault) shred(id string, rec *kuma.ForgetReply) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.keys, id)
	v.forgotten[id] = rec
}

// harness is one shard's worth of what actors need, on a real SQLite file.
type harness struct {
	sh      *entity.Shard
	vault   *vault
	running sync.WaitGroup
}

func newHarness(t *testing.T, tune func(*entity.Shard)) *harness {
	t.Helper()
	ctx := t.Context()
	store, err := sqlite.Open(ctx, sqlite.Config{Path: filepath.Join(t.TempDir(), "shard-00.db"), Context: "test", Shard: 0, Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{vault: &vault{keys: map[string]*envelope.Key{}, forgotten: map[string]*kuma.ForgetReply{}}}
	t.Cleanup(func() {
		h.running.Wait()
		if err := store.Close(); err != nil {
			t.Error(err)
		}
	})
	clock := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	var clockMu sync.Mutex
	h.sh = &entity.Shard{
		Context: "test", N: 0, Reducer: kuma.MergePatch{}, Limits: kuma.Limits{}.WithDefaults(),
		SnapshotEvery: 100, MailboxLen: 16, MaxReply: 1 << 20,
		Store: store, Keys: h.vault, Vault: h.vault,
		Erase: func(ctx context.Context, p sqlite.PendingForget, events int64) (*kuma.ForgetReply, error) {
			rec := &kuma.ForgetReply{Entity: p.Entity, ForgottenAt: p.RequestedAt, EventsDeleted: events}
			h.vault.shred(p.Entity, rec)
			if _, err := store.Purge(ctx, p.Entity); err != nil {
				return nil, err
			}
			return rec, nil
		},
		WaitPublished: func(context.Context, int64) error { return nil },
		Published:     func() int64 { return 0 },
		Running:       &h.running,
		Metrics: &entity.Metrics{
			Requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "requests"}, []string{"op", "code"}),
			Appended: prometheus.NewCounter(prometheus.CounterOpts{Name: "appended"}),
			Fenced:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fenced"}, []string{"reason"}),
		},
		Tracer: noop.NewTracerProvider().Tracer(""),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		// Each call a second later, so that event times tell events apart.
		Now: func() time.Time {
			clockMu.Lock()
			defer clockMu.Unlock()
			clock = clock.Add(time.Second)
			return clock
		},
	}
	if tune != nil {
		tune(h.sh)
	}
	return h
}

// answer is what an actor sent back for one request.
type answer struct {
	body []byte
	err  error
}

// send queues a request on a and returns the channel its answer comes on.
func send(t *testing.T, a *entity.Actor, op string, body any) <-chan answer {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan answer, 1)
	a.Reserve()
	ok := a.Enqueue(&entity.Request{Op: op, Body: b, Ctx: t.Context(),
		Reply: func(_ context.Context, body []byte, err error) { ch <- answer{body, err} }})
	if !ok {
		a.Unreserve()
		t.Fatalf("%s: the mailbox refused the request", op)
	}
	return ch
}

// do sends a request and decodes its answer into out (when not nil).
func do(t *testing.T, a *entity.Actor, op string, body, out any) error {
	t.Helper()
	select {
	case got := <-send(t, a, op, body):
		if got.err == nil && out != nil {
			if err := json.Unmarshal(got.body, out); err != nil {
				t.Fatalf("%s: %v in %s", op, err, got.body)
			}
		}
		return got.err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no answer", op)
		return nil
	}
}

func appendOne(n int) kuma.AppendRequest {
	return kuma.AppendRequest{Events: []kuma.EventInput{{Type: "Set", Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, n))}}}
}

func ptr[T any](v T) *T { return &v }

func wantCode(t *testing.T, what string, err error, want kuma.Code) {
	t.Helper()
	if got := kuma.ErrorCode(err); err == nil || got != want {
		t.Fatalf("%s: got %v (%s), want %s", what, err, got, want)
	}
}

func TestAppendChecksTheExpectedVersion(t *testing.T) {
	h := newHarness(t, nil)
	a := entity.New(h.sh, "meter-1")
	req := appendOne(1)
	req.ExpectedVersion = ptr(int64(0))
	var r kuma.AppendReply
	if err := do(t, a, kuma.OpAppend, req, &r); err != nil {
		t.Fatal(err)
	}
	if r.FirstVersion != 1 || r.LastVersion != 1 || r.Position != (kuma.Position{Shard: 0, Seq: 1}).String() {
		t.Fatalf("first append: got %+v, want version 1 at the shard's first position", r)
	}
	// Expecting the version it had before: a conflict that says where it is.
	err := do(t, a, kuma.OpAppend, req, nil)
	wantCode(t, "stale expected version", err, kuma.CodeVersionConflict)
	var kerr *kuma.Error
	if !errors.As(err, &kerr) || fmt.Sprint(kerr.Details["actual_version"]) != "1" {
		t.Fatalf("conflict details: got %+v, want actual_version 1", kerr)
	}
	req.ExpectedVersion = ptr(int64(1))
	if err := do(t, a, kuma.OpAppend, req, &r); err != nil {
		t.Fatal(err)
	}
	if r.FirstVersion != 2 || r.LastVersion != 2 {
		t.Fatalf("append at the right version: got %d..%d, want 2..2", r.FirstVersion, r.LastVersion)
	}
	if got, want := testkit.CounterValue(t, h.sh.Metrics.Requests.WithLabelValues(kuma.OpAppend, string(kuma.CodeVersionConflict))), 1.0; got != want {
		t.Fatalf("conflicts counted: got %v, want %v", got, want)
	}
}

func TestRetryWithTheSameIdempotencyKeyIsADuplicate(t *testing.T) {
	h := newHarness(t, nil)
	a := entity.New(h.sh, "order-7")
	if err := do(t, a, kuma.OpAppend, appendOne(0), nil); err != nil {
		t.Fatal(err)
	}
	req := kuma.AppendRequest{Events: []kuma.EventInput{{Type: "A", Data: json.RawMessage(`{"a":1}`)}, {Type: "B", Data: json.RawMessage(`{"b":2}`)}},
		IdempotencyKey: "pay-1", ExpectedVersion: ptr(int64(1))}
	var first, again kuma.AppendReply
	if err := do(t, a, kuma.OpAppend, req, &first); err != nil {
		t.Fatal(err)
	}
	// The retry expects the version the first attempt moved past: it must
	// still be answered as that attempt's success, not as a conflict.
	if err := do(t, a, kuma.OpAppend, req, &again); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if !again.Duplicate || first.Duplicate || again.FirstVersion != first.FirstVersion || again.LastVersion != first.LastVersion ||
		again.Position != first.Position || !again.Time.Equal(first.Time) {
		t.Fatalf("retry: got %+v, want the first attempt's %+v marked duplicate", again, first)
	}
	var st kuma.ReadReply
	if err := do(t, a, kuma.OpRead, struct{}{}, &st); err != nil {
		t.Fatal(err)
	}
	if st.Version != 3 {
		t.Fatalf("version after a retried append: got %d, want 3", st.Version)
	}
	if got, want := testkit.CounterValue(t, h.sh.Metrics.Appended), 3.0; got != want {
		t.Fatalf("events counted appended: got %v, want %v (a duplicate adds none)", got, want)
	}
	// A new actor (the entity passivated) finds the record in the file.
	b := entity.New(h.sh, "order-7")
	if err := do(t, b, kuma.OpAppend, req, &again); err != nil || !again.Duplicate || again.LastVersion != 3 {
		t.Fatalf("retry after reload: got %+v, %v; want a duplicate ending at 3", again, err)
	}
}

func TestReadAtAVersionFoldsFromTheNearestSnapshot(t *testing.T) {
	h := newHarness(t, func(sh *entity.Shard) { sh.SnapshotEvery = 2 })
	a := entity.New(h.sh, "sensor-3")
	for i := 1; i <= 5; i++ {
		req := appendOne(i)
		req.Events[0].Data = json.RawMessage(fmt.Sprintf(`{"n":%d,"v%d":true}`, i, i))
		if err := do(t, a, kuma.OpAppend, req, nil); err != nil {
			t.Fatal(err)
		}
	}
	// A fresh actor loads from the snapshot at 4 plus event 5: the same
	// answers as the one that folded every event.
	for _, actor := range []*entity.Actor{a, entity.New(h.sh, "sensor-3")} {
		for _, tc := range []struct {
			at   *int64
			want string
		}{
			{nil, `{"n":5,"v1":true,"v2":true,"v3":true,"v4":true,"v5":true}`},
			{ptr(int64(1)), `{"n":1,"v1":true}`},
			{ptr(int64(3)), `{"n":3,"v1":true,"v2":true,"v3":true}`},
			{ptr(int64(4)), `{"n":4,"v1":true,"v2":true,"v3":true,"v4":true}`},
		} {
			var r kuma.ReadReply
			if err := do(t, actor, kuma.OpRead, kuma.ReadRequest{AtVersion: tc.at}, &r); err != nil {
				t.Fatal(err)
			}
			if string(r.State) != tc.want {
				t.Fatalf("read at %v: got %s, want %s", tc.at, r.State, tc.want)
			}
		}
	}
	err := do(t, a, kuma.OpRead, kuma.ReadRequest{AtVersion: ptr(int64(6))}, nil)
	wantCode(t, "read past the last version", err, kuma.CodeNotFound)
	err = do(t, entity.New(h.sh, "nobody"), kuma.OpRead, struct{}{}, nil)
	wantCode(t, "read of an entity never written", err, kuma.CodeNotFound)
}

func TestHistoryPagesByCountAndBySize(t *testing.T) {
	h := newHarness(t, nil)
	a := entity.New(h.sh, "log-1")
	for i := 1; i <= 5; i++ {
		if err := do(t, a, kuma.OpAppend, appendOne(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	versions := func(r kuma.HistoryReply) []int64 {
		var out []int64
		for _, e := range r.Events {
			out = append(out, e.Version)
		}
		return out
	}
	for _, tc := range []struct {
		req  kuma.HistoryRequest
		want string
		next *int64
	}{
		{kuma.HistoryRequest{Limit: 2}, "[1 2]", ptr(int64(3))},
		{kuma.HistoryRequest{FromVersion: 3, Limit: 2}, "[3 4]", ptr(int64(5))},
		{kuma.HistoryRequest{FromVersion: 5, Limit: 2}, "[5]", nil},
		{kuma.HistoryRequest{FromVersion: 9}, "[]", nil},
	} {
		var r kuma.HistoryReply
		if err := do(t, a, kuma.OpHistory, tc.req, &r); err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(versions(r)); got != tc.want || fmt.Sprint(r.NextVersion) != fmt.Sprint(tc.next) &&
			(r.NextVersion == nil || tc.next == nil || *r.NextVersion != *tc.next) {
			t.Fatalf("history %+v: got %s next %v, want %s next %v", tc.req, got, r.NextVersion, tc.want, tc.next)
		}
	}

	// Under a small answer limit the page is cut by size, and says where
	// to go on; the bytes are what json.Marshal makes of the reply.
	small := newHarness(t, func(sh *entity.Shard) { sh.MaxReply = 400 })
	b := entity.New(small.sh, "log-2")
	for i := 1; i <= 5; i++ {
		if err := do(t, b, kuma.OpAppend, appendOne(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	ch := send(t, b, kuma.OpHistory, kuma.HistoryRequest{})
	got := <-ch
	if got.err != nil {
		t.Fatal(got.err)
	}
	var r kuma.HistoryReply
	if err := json.Unmarshal(got.body, &r); err != nil {
		t.Fatal(err)
	}
	if len(got.body) > 400 || len(r.Events) == 0 || len(r.Events) >= 5 || r.NextVersion == nil || *r.NextVersion != int64(len(r.Events)+1) {
		t.Fatalf("history under 400 bytes: got %d bytes, %d events, next %v", len(got.body), len(r.Events), r.NextVersion)
	}
	if want, _ := json.Marshal(r); string(want) != string(got.body) {
		t.Fatalf("history bytes:\n got %s\nwant %s", got.body, want)
	}
}

func TestForgottenEntityRefusesAppends(t *testing.T) {
	h := newHarness(t, nil)
	a := entity.New(h.sh, "user-9")
	for i := 1; i <= 3; i++ {
		if err := do(t, a, kuma.OpAppend, appendOne(i), nil); err != nil {
			t.Fatal(err)
		}
	}
	var rec kuma.ForgetReply
	if err := do(t, a, kuma.OpForget, kuma.ForgetRequest{Reason: "asked"}, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.Entity != "user-9" || rec.EventsDeleted != 3 {
		t.Fatalf("forget: got %+v, want user-9 with 3 events deleted", rec)
	}
	if _, ok, err := h.sh.Store.Entity(t.Context(), "user-9"); err != nil || ok {
		t.Fatalf("the entity's rows after forget: found %v, %v; want none", ok, err)
	}
	wantCode(t, "append after forget", do(t, a, kuma.OpAppend, appendOne(4), nil), kuma.CodeEntityForgotten)
	wantCode(t, "read after forget", do(t, a, kuma.OpRead, struct{}{}, nil), kuma.CodeEntityForgotten)
	// Forget again answers the first record.
	var again kuma.ForgetReply
	if err := do(t, a, kuma.OpForget, kuma.ForgetRequest{}, &again); err != nil || !again.ForgottenAt.Equal(rec.ForgottenAt) {
		t.Fatalf("forget again: got %+v, %v; want the first record %+v", again, err, rec)
	}
	// A new actor has no rows to load: the vault's shred refuses it too,
	// and nothing is written under a new key.
	b := entity.New(h.sh, "user-9")
	wantCode(t, "append by a new actor after forget", do(t, b, kuma.OpAppend, appendOne(4), nil), kuma.CodeEntityForgotten)
	if _, ok, _ := h.sh.Store.Entity(t.Context(), "user-9"); ok {
		t.Fatal("an append after forget stored events")
	}
	wantCode(t, "read by a new actor after forget", do(t, entity.New(h.sh, "user-9"), kuma.OpRead, struct{}{}, nil), kuma.CodeEntityForgotten)
}

func TestFullMailboxIsRefused(t *testing.T) {
	h := newHarness(t, func(sh *entity.Shard) { sh.MailboxLen = 2 })
	a := entity.New(h.sh, "hot")
	if a.Busy() {
		t.Fatal("a new actor is busy")
	}
	// The first request holds the actor in its reply until released.
	release := make(chan struct{})
	held := make(chan struct{})
	a.Reserve()
	a.Enqueue(&entity.Request{Op: kuma.OpRead, Body: []byte(`{}`), Ctx: t.Context(),
		Reply: func(context.Context, []byte, error) { close(held); <-release }})
	<-held
	// The mailbox is empty again (the first is running): two fit, a third not.
	first, second := send(t, a, kuma.OpAppend, appendOne(1)), send(t, a, kuma.OpAppend, appendOne(2))
	a.Reserve()
	if a.Enqueue(&entity.Request{Op: kuma.OpAppend, Body: []byte(`{}`), Ctx: t.Context(),
		Reply: func(context.Context, []byte, error) { t.Error("a refused request was answered") }}) {
		t.Fatal("a third request was queued on a mailbox of 2")
	}
	a.Unreserve()
	if !a.Busy() {
		t.Fatal("an actor with queued requests is not busy")
	}
	close(release)
	for i, ch := range []<-chan answer{first, second} {
		if got := <-ch; got.err != nil {
			t.Fatalf("queued request %d: %v", i+1, got.err)
		}
	}
	h.running.Wait() // the goroutine ends with the queue
	if a.Busy() {
		t.Fatal("an actor that answered everything is busy")
	}
}

func TestReplicatedAppendWaitsForTheStream(t *testing.T) {
	published := make(chan int64, 1)
	h := newHarness(t, func(sh *entity.Shard) {
		sh.Replicated = true
		sh.WaitPublished = func(ctx context.Context, seq int64) error {
			select {
			case p := <-published:
				if p < seq {
					return fmt.Errorf("published %d, waited for %d", p, seq)
				}
				return nil
			case <-ctx.Done():
				return kuma.Errorf(kuma.CodeTimeout, "not published")
			}
		}
	})
	a := entity.New(h.sh, "acct")
	ch := send(t, a, kuma.OpAppend, appendOne(1))
	select {
	case got := <-ch:
		t.Fatalf("answered before the stream had the events: %+v", got)
	case <-time.After(50 * time.Millisecond):
	}
	published <- 1
	if got := <-ch; got.err != nil {
		t.Fatal(got.err)
	}
}

func TestAnswerTooLargeIsRefusedAndCounted(t *testing.T) {
	h := newHarness(t, func(sh *entity.Shard) { sh.MaxReply = 150 })
	a := entity.New(h.sh, "big")
	req := kuma.AppendRequest{Events: []kuma.EventInput{{Type: "Set", Data: json.RawMessage(fmt.Sprintf(`{"pad":%q}`, strings.Repeat("x", 200)))}}}
	if err := do(t, a, kuma.OpAppend, req, nil); err != nil {
		t.Fatal(err)
	}
	err := do(t, a, kuma.OpRead, struct{}{}, nil)
	wantCode(t, "read of a state over the limit", err, kuma.CodePayloadTooLarge)
	if got := testkit.CounterValue(t, h.sh.Metrics.Requests.WithLabelValues(kuma.OpRead, string(kuma.CodePayloadTooLarge))); got != 1 {
		t.Fatalf("payload_too_large reads counted: got %v, want 1", got)
	}
}
