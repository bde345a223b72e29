package shardnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/testkit"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/services/shardnode/entity"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace/noop"
)

// The shard's own rules (its mailboxes, its idle sweep, its stop), on a
// real SQLite file and with no NATS server: a shard only has the shardDeps
// it is given, so these tests give it theirs. Requests are handed to
// dispatch as the shard's subscription would, with the answer sent to the
// test instead of a reply subject.

// manualClock is a wall clock that moves only when the test moves it. It
// counts its reads: once the actors are idle only the sweep reads it, once
// per pass, which tells the test that a pass went by.
type manualClock struct {
	ns    atomic.Int64
	reads atomic.Int64
}

func newManualClock() *manualClock {
	c := &manualClock{}
	// In the past: a sweep that took the real clock instead would find
	// every actor long idle.
	c.ns.Store(time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *manualClock) now() time.Time {
	c.reads.Add(1)
	return time.Unix(0, c.ns.Load()).UTC()
}

func (c *manualClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// awaitSweeps returns once n whole sweep passes began and ended after the
// call (the pass that reads the clock n+1 times from now began after the
// n-th ended).
func (c *manualClock) awaitSweeps(t *testing.T, n int) {
	t.Helper()
	want := c.reads.Load() + int64(n) + 1
	waitFor(t, fmt.Sprintf("%d sweep passes (each reads the shard's clock)", n), func() bool { return c.reads.Load() >= want })
}

// nobodyForgotten is the keyvault as far as a read of an entity nobody
// wrote asks it: nobody was forgotten. Anything else is not asked in these
// tests, and would panic on the nil KeyVault inside.
type nobodyForgotten struct{ KeyVault }

func (nobodyForgotten) Forgotten(context.Context, string, string) (*kuma.ForgetReply, error) {
	return nil, nil
}

// newTestShard opens shard 0 of a one-shard context "default" on a file in
// t.TempDir(), with shardDeps for a test (no NATS: nc and js are nil, which
// the shard does not touch before it subscribes or catches up) that tune
// may change. The shard is closed when the test ends.
func newTestShard(t *testing.T, tune func(*shardDeps)) *shard {
	t.Helper()
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	deps := shardDeps{
		logger: slog.New(slog.DiscardHandler), tracer: noop.NewTracerProvider().Tracer("test"),
		now: time.Now, leaseNow: func() time.Duration { return 0 },
		idleTimeout: time.Hour, mailboxLen: 4, snapshotEvery: 100,
		dataDir: dir, metrics: m, vault: nobodyForgotten{},
		feedSlots: make(chan struct{}, 1), backupSlots: make(chan struct{}, 1),
		corrupt: func(kctx string, n int, err error) error {
			t.Errorf("shard %d of %q reported corrupt: %v", n, kctx, err)
			return corruptError(kctx, n)
		},
		lost:      func(why string) { t.Errorf("shard reported lost: %s", why) },
		failpoint: func(string) {},
	}
	if tune != nil {
		tune(&deps)
	}
	store, err := sqlite.Open(t.Context(), sqlite.Config{Path: shardPath(dir, "default", 0), Context: "default", Shard: 0, Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	sh := newShard(deps, &ContextConfig{Name: "default", Shards: 1}, 0, store, 16, 1<<20)
	t.Cleanup(func() {
		if err := sh.close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return sh
}

// readRequest is a read of an entity, as the shard's subscription makes
// one; its answer goes to the channel returned. With hold set the answer
// does not return until hold is closed, which keeps the actor busy.
func readRequest(ctx context.Context, hold <-chan struct{}) (*entity.Request, <-chan error) {
	answered := make(chan error, 1)
	return &entity.Request{Op: kuma.OpRead, Body: []byte(`{}`), Ctx: ctx,
		Reply: func(_ context.Context, _ []byte, err error) {
			answered <- err
			if hold != nil {
				<-hold
			}
		}}, answered
}

// awaitAnswer is the answer to a request dispatched, which must come.
func awaitAnswer(t *testing.T, what string, answered <-chan error) error {
	t.Helper()
	select {
	case err := <-answered:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no answer in 10 s", what)
		return nil
	}
}

// waitFor polls cond until it holds; after 10 s the test fails.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
	}
}

// liveActorOf is the shard's actor of id, or nil when it has none.
func (sh *shard) liveActorOf(id string) *liveActor {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return sh.actors[id]
}

// TestDispatchRefusesAFullMailbox: with mailboxes of 1, an entity whose
// actor is busy and has one request waiting gets its next request refused
// at once as unavailable, counted in kuma_mailbox_full_total, while another
// entity of the shard is served. The refused request is never answered by
// the actor and does not keep it busy once the others are answered.
func TestDispatchRefusesAFullMailbox(t *testing.T) {
	sh := newTestShard(t, func(d *shardDeps) { d.mailboxLen = 1 })
	ctx := t.Context()
	hold := make(chan struct{})
	release := sync.OnceFunc(func() { close(hold) })
	defer release()

	first, firstAnswered := readRequest(ctx, hold)
	if err := sh.dispatch("hot-meter", first); err != nil {
		t.Fatalf("dispatch to a new actor: got %v, want nil", err)
	}
	// The actor has taken the first request off its mailbox and is held
	// in its answer: the mailbox is empty and the actor busy.
	if err := awaitAnswer(t, "first read", firstAnswered); !errors.Is(err, kuma.ErrNotFound) {
		t.Fatalf("read of an entity nobody wrote: got %v, want not_found", err)
	}
	waiting, waitingAnswered := readRequest(ctx, nil)
	if err := sh.dispatch("hot-meter", waiting); err != nil {
		t.Fatalf("dispatch into a mailbox with room: got %v, want nil", err)
	}
	refused, refusedAnswered := readRequest(ctx, nil)
	err := sh.dispatch("hot-meter", refused)
	if !errors.Is(err, kuma.ErrUnavailable) {
		t.Fatalf("dispatch into a full mailbox: got %v, want unavailable", err)
	}
	if got, want := testkit.CounterValue(t, sh.metrics.mailboxFull), 1.0; got != want {
		t.Fatalf("kuma_mailbox_full_total: got %v, want %v", got, want)
	}

	// The shard's callback did not wait on the hot entity: a neighbour
	// is served while it is held.
	other, otherAnswered := readRequest(ctx, nil)
	if err := sh.dispatch("cold-meter", other); err != nil {
		t.Fatalf("dispatch to another entity: got %v, want nil", err)
	}
	if err := awaitAnswer(t, "neighbour's read", otherAnswered); !errors.Is(err, kuma.ErrNotFound) {
		t.Fatalf("neighbour's read: got %v, want not_found", err)
	}

	release()
	if err := awaitAnswer(t, "waiting read", waitingAnswered); !errors.Is(err, kuma.ErrNotFound) {
		t.Fatalf("the read that waited in the mailbox: got %v, want not_found", err)
	}
	a := sh.liveActorOf("hot-meter")
	if a == nil {
		t.Fatal("the hot entity's actor is gone")
	}
	// A refusal that left its reservation would keep the actor busy, and
	// so never passivated, for ever.
	waitFor(t, "the hot actor to be idle", func() bool { return !a.Busy() })
	select {
	case err := <-refusedAnswered:
		t.Fatalf("the refused request was answered by the actor too: %v", err)
	default:
	}
}

// TestSweepPassivatesIdleActorsByTheClock: the sweep passivates an actor
// unused for longer than IdleTimeout by the shard's clock (not the real
// one), and never a busy one, however long unused.
func TestSweepPassivatesIdleActorsByTheClock(t *testing.T) {
	const idle = 40 * time.Millisecond // a sweep every 10 ms
	clock := newManualClock()
	sh := newTestShard(t, func(d *shardDeps) { d.now, d.idleTimeout = clock.now, idle })
	ctx := t.Context()
	hold := make(chan struct{})
	release := sync.OnceFunc(func() { close(hold) })
	defer release()

	quiet, quietAnswered := readRequest(ctx, nil)
	busy, busyAnswered := readRequest(ctx, hold)
	for id, req := range map[string]*entity.Request{"quiet-meter": quiet, "busy-meter": busy} {
		if err := sh.dispatch(id, req); err != nil {
			t.Fatalf("dispatch to %s: got %v, want nil", id, err)
		}
	}
	awaitAnswer(t, "quiet read", quietAnswered)
	awaitAnswer(t, "busy read", busyAnswered) // and held in its answer
	a := sh.liveActorOf("quiet-meter")
	waitFor(t, "the quiet actor to be idle", func() bool { return !a.Busy() })

	live := func() (quiet, busy bool) {
		return sh.liveActorOf("quiet-meter") != nil, sh.liveActorOf("busy-meter") != nil
	}
	// Unused for exactly IdleTimeout is not yet longer than it.
	clock.advance(idle)
	clock.awaitSweeps(t, 2)
	if q, b := live(); !q || !b {
		t.Fatalf("after IdleTimeout by the shard's clock: quiet live %v, busy live %v; want both live", q, b)
	}
	if got := sh.stats().Passivated; got != 0 {
		t.Fatalf("passivated: got %d, want 0", got)
	}

	clock.advance(time.Nanosecond)
	waitFor(t, "the quiet actor to be passivated", func() bool { q, _ := live(); return !q })
	if _, b := live(); !b {
		t.Fatal("the busy actor was passivated while it held a request")
	}
	if st := sh.stats(); st.Passivated != 1 || st.LiveActors != 1 {
		t.Fatalf("stats: got %d passivated and %d live, want 1 and 1", st.Passivated, st.LiveActors)
	}
	release()
}

// TestDispatchOnAStoppedShardIsUnavailable: once the shard stopped
// serving, a request that still reaches dispatch is refused as
// unavailable (the router and clients retry it at the next owner) and no
// actor is made for it.
func TestDispatchOnAStoppedShardIsUnavailable(t *testing.T) {
	sh := newTestShard(t, nil)
	sh.stopServing(t.Context())
	req, answered := readRequest(t.Context(), nil)
	err := sh.dispatch("late-meter", req)
	if !errors.Is(err, kuma.ErrUnavailable) {
		t.Fatalf("dispatch on a stopped shard: got %v, want unavailable", err)
	}
	if a := sh.liveActorOf("late-meter"); a != nil {
		t.Fatal("a stopped shard made an actor")
	}
	select {
	case err := <-answered:
		t.Fatalf("a stopped shard's actor answered: %v", err)
	default:
	}
}

// TestStorageErrorTellsTheNode: a damaged file is reported to the node
// (corrupt, with the shard's context and number) and answered as corrupt;
// a full disk is counted in kuma_disk_full_total and answered as such,
// without a report.
func TestStorageErrorTellsTheNode(t *testing.T) {
	type report struct {
		kctx string
		n    int
		err  error
	}
	var reports []report
	sh := newTestShard(t, func(d *shardDeps) {
		d.corrupt = func(kctx string, n int, err error) error {
			reports = append(reports, report{kctx, n, err})
			return corruptError(kctx, n)
		}
	})

	damaged := fmt.Errorf("read: %w", sqlite.ErrCorrupt)
	out, reported := sh.storageError(damaged)
	if got, want := out.Error(), corruptError("default", 0).Error(); got != want || !reported {
		t.Fatalf("a damaged file: got %q (reported %v), want %q (reported)", got, reported, want)
	}
	if len(reports) != 1 || reports[0] != (report{"default", 0, damaged}) {
		t.Fatalf("reports to the node: got %+v, want one of shard 0 of \"default\" with %v", reports, damaged)
	}

	out, reported = sh.storageError(fmt.Errorf("write: %w", syscall.ENOSPC))
	if got, want := out.Error(), diskFullError("default", 0).Error(); got != want || !reported {
		t.Fatalf("a full disk: got %q (reported %v), want %q (reported)", got, reported, want)
	}
	if got, want := testkit.CounterValue(t, sh.metrics.diskFull), 1.0; got != want {
		t.Fatalf("kuma_disk_full_total: got %v, want %v", got, want)
	}
	if len(reports) != 1 {
		t.Fatalf("a full disk was reported to the node as corrupt: %+v", reports[1:])
	}
}
