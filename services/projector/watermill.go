package projector

// The projector's one adapter to Watermill. The design names Watermill: its
// Router runs every generation's subscription with the middleware the
// projector relies on (CorrelationID, Retry, Recoverer), over
// watermill-nats's JetStream subscriber. That subscriber (v2 of
// watermill-nats, which calls itself experimental) and the Router need the
// workarounds below; they all live in this file, and the rest of the
// projector sees a feed (generation.go) and streamMessage, no Watermill type.
//
//  1. The unmarshaler never fails. On an Unmarshal error the subscriber's
//     handleMsg logs it and goes on to read the returned message's UUID: a
//     nil message panics on the NATS client's delivery goroutine. So
//     unmarshaler keeps whatever it can read, and the handler (decode)
//     refuses what it cannot use, visibly, instead of losing it.
//  2. Consumers are created outside. Router.RunHandlers stops at the first
//     handler whose Subscribe fails and keeps that handler, unstarted: every
//     later RunHandlers (every later subscription of any generation) tries
//     it again and fails the same way. So the ResourceInitializer only
//     hands over a consumer made beforehand (ensureConsumer, consumer.go)
//     and cannot fail. Making it outside also gives each subscription a
//     durable of its own name, which the handler is named after: the
//     Router panics on a second handler of a name it holds.
//  3. The gate. When a handler stops, the subscriber's monitor goroutine
//     closes the output channel while a delivery (handleMsg) may be about
//     to send on it; the library says as much beside that select, and the
//     send panics. guarded makes each delivery hold a gate until its ack or
//     nack, and a subscription's gate is closed before its handler stops.
//  4. One NATS connection per subscription. Subscriber.Close drains the
//     connection it was given (a TODO there: shared connections are not
//     supported). A shared one would be drained by the first generation
//     stopped, taking the micro service and every other subscriber with
//     it; so each subscription dials its own (Config.Dial).
//  5. A replacement starts before the handler it replaces stops: the Router
//     closes for good once all its handlers have stopped
//     (watchAllHandlersStopped). feed.retirer is what the caller stops the
//     old one with, after.
//  6. Adding a handler is ordered against closing the Router (wmRouter.mu
//     and stopping): a handler added while the Router closes raced
//     Watermill's own close (go test -race in CI), and one added after
//     would never run.
//  7. A message is handed back without an error (errGiveBack): the Router
//     logs every error a handler returns, once per redelivery of a
//     projection stopped at an event.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmjs "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// wmRouter is the one Watermill Router of a projector, in which every
// generation's subscription runs. Its methods are safe for concurrent use.
type wmRouter struct {
	log     watermill.LoggerAdapter
	router  *message.Router
	runCtx  context.Context // handlers live as long as the router's run
	dial    func() (*nats.Conn, error)
	ackWait time.Duration
	nakMax  time.Duration

	// mu orders adding a handler (subscribe) against close (workaround
	// 6); stopping is set under it before the close.
	mu       sync.Mutex
	stopping bool
}

// errStopping is what adding a subscription answers once Stop has begun.
var errStopping = errors.New("projector: stopping")

// wmRouterConfig is what a wmRouter is built from.
type wmRouterConfig struct {
	Logger *slog.Logger
	// RunCtx is the context of the router's run: handlers live as long
	// as it, not as the context of whoever subscribed.
	RunCtx context.Context
	// Dial opens a subscription's own connection (workaround 4).
	Dial func() (*nats.Conn, error)
	// AckWait bounds one delivery's handling; NakMax the nack delay.
	AckWait, NakMax time.Duration
	// Retryable tells the Retry middleware which handler errors may
	// pass by themselves.
	Retryable func(error) bool
}

// newWMRouter builds the router and its middleware, outermost first:
// CorrelationID; Retry (3 retries, 50 ms doubling to 1 s) for what
// Retryable allows; Recoverer, innermost, so that a panic becomes an error
// Retry sees.
func newWMRouter(c wmRouterConfig) (*wmRouter, error) {
	// Watermill's per-message Info lines are debug detail here.
	log := watermill.NewSlogLoggerWithLevelMapping(c.Logger.With("component", "watermill"), map[slog.Level]slog.Level{
		slog.LevelInfo: slog.LevelDebug,
	})
	r, err := message.NewRouter(message.RouterConfig{CloseTimeout: 10 * time.Second}, log)
	if err != nil {
		return nil, err
	}
	r.AddMiddleware(
		middleware.CorrelationID,
		middleware.Retry{
			MaxRetries: 3, InitialInterval: 50 * time.Millisecond, MaxInterval: time.Second, Multiplier: 2,
			ShouldRetry: func(p middleware.RetryParams) bool { return c.Retryable(p.Err) }, Logger: log,
		}.Middleware,
		// Innermost, so a panic becomes an error that Retry sees.
		middleware.Recoverer,
	)
	return &wmRouter{log: log, router: r, runCtx: c.RunCtx, dial: c.Dial, ackWait: c.AckWait, nakMax: c.NakMax}, nil
}

// run runs the router until it is closed; running is closed once it runs.
func (r *wmRouter) run() error               { return r.router.Run(r.runCtx) }
func (r *wmRouter) running() <-chan struct{} { return r.router.Running() }

// refuse makes every later subscribe answer errStopping.
func (r *wmRouter) refuse() {
	r.mu.Lock()
	r.stopping = true
	r.mu.Unlock()
}

// close stops every handler and closes their subscribers; close the gates
// first (workaround 3).
func (r *wmRouter) close() error { return r.router.Close() }

// newFeed is a generation's feed, with no subscription yet.
func (r *wmRouter) newFeed() *wmFeed { return &wmFeed{r: r} }

// wmFeed is a generation's feed (see feed): its current subscription's
// handler, subscriber and gate. subscribe, retirer and stop are called one
// at a time (the generation's resubMu, or before anyone else sees it).
type wmFeed struct {
	r       *wmRouter
	handler *message.Handler
	sub     *wmjs.Subscriber

	mu sync.Mutex
	gt *gate // of the current subscription
}

var _ feed = (*wmFeed)(nil)

func (f *wmFeed) subscribe(ctx context.Context, s subscription) error {
	r := f.r
	nc, err := r.dial()
	if err != nil {
		return fmt.Errorf("projector: connect: %w", err)
	}
	cons, err := s.consumer(ctx)
	if err != nil {
		nc.Close()
		return err
	}
	gt := newGate(time.Now())
	f.mu.Lock()
	f.gt = gt
	f.mu.Unlock()
	sub, err := wmjs.NewSubscriber(wmjs.SubscriberConfig{
		Conn:                nc,
		Logger:              r.log,
		AckWaitTimeout:      r.ackWait,
		ResourceInitializer: resources(cons, gt),
		NakDelay:            backoff{max: r.nakMax},
		Unmarshaler:         unmarshaler{},
		// A lost ack only means a redelivery, which the read model's
		// positions recognise; waiting for the server to confirm each ack
		// would cost a round trip per message.
		AckAsync: true,
		ConsumeOptions: []jetstream.PullConsumeOpt{jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			s.onError(err)
		})},
	})
	if err != nil {
		nc.Close()
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopping {
		_ = sub.Close()
		return errStopping
	}
	f.sub = sub
	f.handler = r.router.AddNoPublisherHandler(cons.CachedInfo().Name, s.topic, sub, func(wm *message.Message) error {
		err := s.handle(toStreamMessage(wm))
		if errors.Is(err, errGiveBack) {
			// Workaround 7: redelivered after the nack delay, and
			// nothing logged.
			wm.Nack()
			return nil
		}
		return err
	})
	if err := r.router.RunHandlers(r.runCtx); err != nil {
		sub.Close()
		return err
	}
	return nil
}

func (f *wmFeed) retirer() func(ctx context.Context) error {
	h, sub := f.handler, f.sub
	return func(ctx context.Context) error {
		stopHandler(ctx, h)
		if sub != nil {
			return sub.Close()
		}
		return nil
	}
}

func (f *wmFeed) closeGate() {
	if gt := f.gate(); gt != nil {
		gt.close()
	}
}

func (f *wmFeed) gate() *gate {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gt
}

func (f *wmFeed) stop(ctx context.Context) error {
	f.closeGate()
	return f.retirer()(ctx)
}

// stopHandler stops a started handler and waits, up to ctx, until it has.
func stopHandler(ctx context.Context, h *message.Handler) {
	if h == nil {
		return
	}
	select {
	case <-h.Started():
		h.Stop()
		select {
		case <-h.Stopped():
		case <-ctx.Done():
		}
	default:
	}
}

// Metadata keys the projector's unmarshaler sets on every Watermill message.
const (
	metaStreamSeq = "kuma_stream_seq"
	metaSubject   = "kuma_subject"
	metaPending   = "kuma_pending"
)

// unmarshaler turns a JetStream message into a Watermill message that keeps
// what the projector needs: the stream sequence (its resume point), the
// subject (events or forget notice), and the headers, trace context
// included. It never fails (workaround 1).
type unmarshaler struct{}

func (unmarshaler) Unmarshal(m jetstream.Msg) (*message.Message, error) {
	id := m.Headers().Get(nats.MsgIdHdr)
	wm := message.NewMessage(id, m.Data())
	for k, v := range m.Headers() {
		if len(v) > 0 {
			wm.Metadata.Set(k, v[0])
		}
	}
	wm.Metadata.Set(metaSubject, m.Subject())
	if md, err := m.Metadata(); err == nil {
		wm.Metadata.Set(metaStreamSeq, strconv.FormatUint(md.Sequence.Stream, 10))
		wm.Metadata.Set(metaPending, strconv.FormatUint(md.NumPending, 10))
	}
	if id == "" {
		wm.UUID = wm.Metadata.Get(metaStreamSeq)
	}
	// The message id is the correlation id: one commit group, one id, in
	// every log line about it.
	middleware.SetCorrelationID(wm.UUID, wm)
	return wm, nil
}

// toStreamMessage is what the handler sees of a Watermill message made by
// unmarshaler.
func toStreamMessage(wm *message.Message) *streamMessage {
	m := &streamMessage{ctx: wm.Context(), subject: wm.Metadata.Get(metaSubject), header: wm.Metadata, payload: wm.Payload}
	if seq, err := strconv.ParseUint(wm.Metadata.Get(metaStreamSeq), 10, 64); err == nil {
		m.seq, m.hasSeq = seq, true
	}
	return m
}

// resources hands the consumer made by ensureConsumer to the subscriber,
// behind the subscription's gate (workaround 2).
func resources(c jetstream.Consumer, gt *gate) wmjs.ResourceInitializer {
	return func(context.Context, jetstream.JetStream, string) (jetstream.Consumer, func(context.Context, watermill.LoggerAdapter), error) {
		return guarded{Consumer: c, g: gt}, nil, nil
	}
}

// guarded wraps a consumer so that stopping a subscription is clean
// (workaround 3): a delivery holds the gate while it runs, and closing the
// gate waits for the delivery in flight and sets stopping before the
// handler is stopped; later deliveries are handed back (nak) for the next
// subscription.
type guarded struct {
	jetstream.Consumer
	g *gate
}

// gate is a subscription's: see guarded. It also tells how long no delivery
// has run, which is how a stalled durable is noticed (generation.stalled).
type gate struct {
	mu       sync.Mutex
	stopping bool
	// busy is set while a delivery runs, last is when one last began or
	// ended (unix ns): with neither for a while and an ack pending on the
	// durable, a delivery or an ack was lost (stalled).
	busy atomic.Bool
	last atomic.Int64
}

func newGate(now time.Time) *gate {
	g := &gate{}
	g.last.Store(now.UnixNano())
	return g
}

// idleFor is how long no delivery has run, zero while one runs.
func (g *gate) idleFor(now time.Time) time.Duration {
	if g.busy.Load() {
		return 0
	}
	return now.Sub(time.Unix(0, g.last.Load()))
}

// close waits for the delivery in flight and lets no other through.
func (g *gate) close() {
	g.mu.Lock()
	g.stopping = true
	g.mu.Unlock()
}

func (c guarded) Consume(h jetstream.MessageHandler, opts ...jetstream.PullConsumeOpt) (jetstream.ConsumeContext, error) {
	return c.Consumer.Consume(func(m jetstream.Msg) {
		c.g.mu.Lock()
		defer c.g.mu.Unlock()
		c.g.busy.Store(true)
		c.g.last.Store(time.Now().UnixNano())
		defer func() {
			c.g.last.Store(time.Now().UnixNano())
			c.g.busy.Store(false)
		}()
		if c.g.stopping {
			// Handed back at once: left unacknowledged, it would hold
			// the durable (one message in flight) for a whole ack wait
			// when a new subscription takes it over.
			_ = m.Nak()
			return
		}
		h(m)
	}, opts...)
}

// backoff is the nack delay: short at first, then at most max, so a stopped
// projection notices an operator's retry or skip within max.
type backoff struct{ max time.Duration }

func (b backoff) WaitTime(n uint64) time.Duration {
	d := 50 * time.Millisecond << min(n, 10)
	return min(d, b.max)
}
