package projector

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	wmjs "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	"github.com/kumadb/kuma/internal/testkit"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The adapter's tests run it against a real embedded nats-server with
// JetStream: each shows one workaround of watermill.go doing its job. They
// are in the package (the adapter is unexported), which cannot import
// internal/kumatest (it imports internal/app, which imports this package),
// so they take the server and the log buffer from internal/testkit.

const wmCtx = "wm"

// wmRig is a router of the adapter on a fresh server with an events
// stream, recording what it logs and every connection it dials.
type wmRig struct {
	t      *testing.T
	nc     *nats.Conn // the shared connection, as the service's
	stream jetstream.Stream
	r      *wmRouter
	logs   *testkit.LogBuffer

	mu    sync.Mutex
	conns []*nats.Conn
}

func newWMRig(t *testing.T, retryable func(error) bool) *wmRig {
	t.Helper()
	srv, nc := testkit.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: kuma.StreamName(wmCtx), Subjects: []string{kuma.EventsWildcard(wmCtx)}})
	if err != nil {
		t.Fatal(err)
	}
	rig := &wmRig{t: t, nc: nc, stream: stream, logs: &testkit.LogBuffer{}}
	runCtx, cancel := context.WithCancel(context.Background())
	rig.r, err = newWMRouter(wmRouterConfig{
		Logger: slog.New(slog.NewTextHandler(rig.logs, nil)),
		RunCtx: runCtx,
		Dial: func() (*nats.Conn, error) {
			c, err := nats.Connect(srv.ClientURL())
			if err == nil {
				rig.mu.Lock()
				rig.conns = append(rig.conns, c)
				rig.mu.Unlock()
			}
			return c, err
		},
		AckWait: 30 * time.Second, NakMax: 50 * time.Millisecond, Retryable: retryable,
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = rig.r.run()
	}()
	<-rig.r.running()
	t.Cleanup(func() {
		rig.r.refuse()
		_ = rig.r.close()
		cancel()
		<-done
	})
	return rig
}

// consumer makes a durable as ensureConsumer does (one message in flight,
// explicit acks), starting at seq.
func (rig *wmRig) consumer(name string, seq uint64) jetstream.Consumer {
	rig.t.Helper()
	cfg := jetstream.ConsumerConfig{Durable: name, AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 1,
		AckWait: 35 * time.Second, FilterSubject: kuma.EventsWildcard(wmCtx)}
	if seq > 1 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, seq
	}
	c, err := rig.stream.CreateConsumer(rig.t.Context(), cfg)
	if err != nil {
		rig.t.Fatal(err)
	}
	return c
}

func (rig *wmRig) publish(msg *nats.Msg) uint64 {
	rig.t.Helper()
	js, _ := jetstream.New(rig.nc)
	ack, err := js.PublishMsg(rig.t.Context(), msg)
	if err != nil {
		rig.t.Fatal(err)
	}
	return ack.Sequence
}

func (rig *wmRig) publishN(n int) {
	rig.t.Helper()
	for range n {
		rig.publish(&nats.Msg{Subject: kuma.EventsSubject(wmCtx, 0), Data: []byte("{}")})
	}
}

func (rig *wmRig) dialed() []*nats.Conn {
	rig.mu.Lock()
	defer rig.mu.Unlock()
	return append([]*nats.Conn(nil), rig.conns...)
}

// seen records the stream sequences a handler was given, in order.
type seen struct {
	mu   sync.Mutex
	seqs []uint64
}

func (s *seen) add(seq uint64) {
	s.mu.Lock()
	s.seqs = append(s.seqs, seq)
	s.mu.Unlock()
}

func (s *seen) get() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]uint64(nil), s.seqs...)
}

// within fails the test unless cond holds before d; d is always shorter
// than the durables' ack wait, so a message left unacknowledged (instead of
// handed back) would fail it.
func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func subscribeTo(c jetstream.Consumer, h func(*streamMessage) error) subscription {
	return subscription{
		consumer: func(context.Context) (jetstream.Consumer, error) { return c, nil },
		topic:    kuma.EventsWildcard(wmCtx),
		handle:   h,
		onError:  func(error) {},
	}
}

// Workaround 1: a message Watermill's own unmarshaler refuses (a header
// with two values) reaches the handler whole, with its stream sequence and
// subject, and the one after it follows: nothing is lost, nothing panics.
func TestWatermillFeedDeliversWhatOthersCannotUnmarshal(t *testing.T) {
	rig := newWMRig(t, func(error) bool { return false })
	odd := &nats.Msg{Subject: kuma.EventsSubject(wmCtx, 3), Data: []byte("not a stream message"), Header: nats.Header{}}
	odd.Header.Add(nats.MsgIdHdr, "odd-1")
	odd.Header.Add("X-Twice", "a")
	odd.Header.Add("X-Twice", "b")
	rig.publish(odd)
	rig.publishN(1)

	peek, err := rig.consumer("peek", 1).Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (wmjs.DefaultUnmarshaler{}).Unmarshal(peek); err == nil {
		t.Fatalf("watermill's DefaultUnmarshaler took a header with two values; the workaround may no longer be needed")
	}

	var got seen
	var first *streamMessage
	var mu sync.Mutex
	f := rig.r.newFeed()
	err = f.subscribe(t.Context(), subscribeTo(rig.consumer("feed", 1), func(m *streamMessage) error {
		mu.Lock()
		if m.seq == 1 {
			first = m
		}
		mu.Unlock()
		got.add(m.seq)
		return nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	within(t, 10*time.Second, "both messages handled", func() bool { return len(got.get()) == 2 })
	if s := got.get(); !slices.Equal(s, []uint64{1, 2}) {
		t.Fatalf("got sequences %v, want [1 2]", s)
	}
	mu.Lock()
	defer mu.Unlock()
	if !first.hasSeq || first.subject != kuma.EventsSubject(wmCtx, 3) || string(first.payload) != "not a stream message" ||
		first.header["X-Twice"] != "a" || first.header[nats.MsgIdHdr] != "odd-1" {
		t.Errorf("got seq %d (%v), subject %q, payload %q, X-Twice %q, id %q; want 1, %q, the body, \"a\", \"odd-1\"",
			first.seq, first.hasSeq, first.subject, first.payload, first.header["X-Twice"], first.header[nats.MsgIdHdr], kuma.EventsSubject(wmCtx, 3))
	}
	if err := f.stop(t.Context()); err != nil {
		t.Errorf("stop: %v", err)
	}
}

// Workaround 2: a subscription whose consumer cannot be made fails alone,
// closing the connection it dialed; the router is not left with a handler
// that fails every later subscription.
func TestWatermillFailedConsumerPoisonsNothing(t *testing.T) {
	rig := newWMRig(t, func(error) bool { return false })
	boom := errors.New("no consumer")
	bad := subscribeTo(nil, func(*streamMessage) error { return nil })
	bad.consumer = func(context.Context) (jetstream.Consumer, error) { return nil, boom }
	if err := rig.r.newFeed().subscribe(t.Context(), bad); !errors.Is(err, boom) {
		t.Fatalf("got %v, want the consumer's error", err)
	}
	if c := rig.dialed(); len(c) != 1 || !c[0].IsClosed() {
		t.Errorf("the failed subscription's connection is left open (%d dialed)", len(c))
	}
	rig.publishN(1)
	var got seen
	f := rig.r.newFeed()
	if err := f.subscribe(t.Context(), subscribeTo(rig.consumer("good", 1), func(m *streamMessage) error {
		got.add(m.seq)
		return nil
	})); err != nil {
		t.Fatalf("a later subscription failed: %v", err)
	}
	within(t, 10*time.Second, "the later subscription delivers", func() bool { return len(got.get()) == 1 })
	_ = f.stop(t.Context())
}

// Workarounds 3 and 5: a subscription replaced while a delivery runs. The
// gate waits for that delivery (applied and acked once), the replacement
// starts before the old handler stops and the router stays up, the old
// subscription applies nothing more (its gate hands back what it is given
// meanwhile), and the replacement applies every later message exactly once,
// in order.
func TestWatermillReplaceMidDelivery(t *testing.T) {
	rig := newWMRig(t, func(error) bool { return false })
	rig.publishN(1)
	durable := rig.consumer("replaced", 1)
	in, release := make(chan struct{}), make(chan struct{})
	var old, next seen
	f := rig.r.newFeed()
	if err := f.subscribe(t.Context(), subscribeTo(durable, func(m *streamMessage) error {
		old.add(m.seq)
		if m.seq == 1 {
			close(in)
			<-release
		}
		return nil
	})); err != nil {
		t.Fatal(err)
	}
	<-in
	closed := make(chan struct{})
	go func() {
		f.closeGate()
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("closeGate returned while a delivery was running")
	case <-time.After(100 * time.Millisecond):
	}
	// As replace does: a durable of a new name (a handler's name, the
	// durable's, is unique in the router) at the applied position + 1.
	retire := f.retirer()
	if err := f.subscribe(t.Context(), subscribeTo(rig.consumer("replacement", 2), func(m *streamMessage) error {
		next.add(m.seq)
		return nil
	})); err != nil {
		t.Fatal(err)
	}
	close(release)
	<-closed
	rig.publishN(3)
	if err := retire(t.Context()); err != nil {
		t.Errorf("retire: %v", err)
	}
	if rig.r.router.IsClosed() {
		t.Fatal("the router closed when the old handler stopped")
	}
	rig.publishN(2)
	within(t, 10*time.Second, "the replacement applies 2 to 6", func() bool { return len(next.get()) >= 5 })
	if s := old.get(); !slices.Equal(s, []uint64{1}) {
		t.Errorf("the old subscription handled %v, want [1]", s)
	}
	if s := next.get(); !slices.Equal(s, []uint64{2, 3, 4, 5, 6}) {
		t.Errorf("the replacement handled %v, want [2 3 4 5 6]", s)
	}
	_ = f.stop(t.Context())
}

// Workaround 4: each subscription dials its own connection; stopping one
// closes that connection only, and the other subscription and the shared
// connection go on.
func TestWatermillOwnConnectionPerSubscription(t *testing.T) {
	rig := newWMRig(t, func(error) bool { return false })
	var a, b seen
	fa, fb := rig.r.newFeed(), rig.r.newFeed()
	for _, x := range []struct {
		f    *wmFeed
		name string
		s    *seen
	}{{fa, "a", &a}, {fb, "b", &b}} {
		if err := x.f.subscribe(t.Context(), subscribeTo(rig.consumer(x.name, 1), func(m *streamMessage) error {
			x.s.add(m.seq)
			return nil
		})); err != nil {
			t.Fatal(err)
		}
	}
	conns := rig.dialed()
	if len(conns) != 2 || conns[0] == conns[1] {
		t.Fatalf("%d connections dialed for two subscriptions, want 2 of their own", len(conns))
	}
	rig.publishN(1)
	within(t, 10*time.Second, "both deliver", func() bool { return len(a.get()) == 1 && len(b.get()) == 1 })
	if err := fa.stop(t.Context()); err != nil {
		t.Fatalf("stop: %v", err)
	}
	within(t, 10*time.Second, "the stopped subscription's connection is closed", conns[0].IsClosed)
	if conns[1].IsClosed() || rig.nc.IsClosed() {
		t.Fatal("stopping one subscription closed another connection")
	}
	rig.publishN(1)
	within(t, 10*time.Second, "the other subscription goes on", func() bool { return len(b.get()) == 2 })
	if s := a.get(); !slices.Equal(s, []uint64{1}) {
		t.Errorf("the stopped subscription handled %v, want [1]", s)
	}
	_ = fb.stop(t.Context())
}

// Workaround 6: once the router refuses, a subscription is not added (and
// its connection is closed).
func TestWatermillRefusedAfterStop(t *testing.T) {
	rig := newWMRig(t, func(error) bool { return false })
	rig.r.refuse()
	err := rig.r.newFeed().subscribe(t.Context(), subscribeTo(rig.consumer("late", 1), func(*streamMessage) error { return nil }))
	if !errors.Is(err, errStopping) {
		t.Fatalf("got %v, want errStopping", err)
	}
	within(t, 10*time.Second, "its connection is closed", func() bool { c := rig.dialed(); return len(c) == 1 && c[0].IsClosed() })
}

// Workaround 7: a message handed back (errGiveBack) comes again after the
// nack delay with nothing logged, where an error is logged by the router.
func TestWatermillGiveBackIsQuiet(t *testing.T) {
	rig := newWMRig(t, func(error) bool { return false })
	rig.publishN(2)
	var got seen
	var tries atomic.Int32
	f := rig.r.newFeed()
	if err := f.subscribe(t.Context(), subscribeTo(rig.consumer("back", 1), func(m *streamMessage) error {
		got.add(m.seq)
		if m.seq == 1 {
			if tries.Add(1) < 3 {
				return errGiveBack
			}
		}
		return nil
	})); err != nil {
		t.Fatal(err)
	}
	within(t, 10*time.Second, "handed back twice, then applied", func() bool { return len(got.get()) == 4 })
	if s := got.get(); !slices.Equal(s, []uint64{1, 1, 1, 2}) {
		t.Errorf("handled %v, want [1 1 1 2]", s)
	}
	if l := rig.logs.String(); strings.Contains(l, "level=ERROR") {
		t.Errorf("a handed-back message was logged as an error:\n%s", l)
	}

	// The same through an error: logged each time. (f stops after: the
	// router closes once it has no handler left, workaround 5.)
	rig.publishN(1)
	var failed atomic.Bool
	g := rig.r.newFeed()
	if err := g.subscribe(t.Context(), subscribeTo(rig.consumer("loud", 3), func(*streamMessage) error {
		if !failed.Swap(true) {
			return errors.New("not yet")
		}
		return nil
	})); err != nil {
		t.Fatal(err)
	}
	within(t, 10*time.Second, "an error is logged", func() bool { return strings.Contains(rig.logs.String(), "not yet") })
	_ = f.stop(t.Context())
	_ = g.stop(t.Context())
}
