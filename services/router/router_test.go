package router_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/services/router"
	"github.com/nats-io/nats.go"
)

const shards = 4

// startRouter runs a router for context "default" on its own connection to
// srv, and returns a client connection; both close when the test ends.
func startRouter(t *testing.T, tune func(*router.Config)) (*router.Service, *nats.Conn) {
	t.Helper()
	srv, nc := kumatest.NATS(t)
	rc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rc.Close)
	return startRouterOn(t, rc, tune), nc
}

// startRouterOn runs a router for context "default" on rc; it stops when
// the test ends.
func startRouterOn(t *testing.T, rc *nats.Conn, tune func(*router.Config)) *router.Service {
	t.Helper()
	cfg := router.Config{Contexts: map[string]int{kuma.DefaultContext: shards}}
	if tune != nil {
		tune(&cfg)
	}
	r, err := router.New(cfg, rc)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Some tests leave requests no owner will answer: do not wait.
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_ = r.Stop(ctx)
	})
	return r
}

// owner subscribes to the shard subject of entity the way a shardnode does,
// answering each request with answer(n), n counting from 1.
func owner(t *testing.T, nc *nats.Conn, entity string, answer func(n int64, m *nats.Msg) *nats.Msg) *nats.Subscription {
	t.Helper()
	var n atomic.Int64
	subject := kuma.ShardSubject(kuma.DefaultContext, placement.ShardOf(entity, shards), kuma.OpRead, entity)
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		out := answer(n.Add(1), m)
		if out == nil {
			return
		}
		out.Subject = m.Reply
		if err := nc.PublishMsg(out); err != nil {
			t.Error(err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sub
}

func ok(_ int64, m *nats.Msg) *nats.Msg {
	return &nats.Msg{Data: []byte(`{"entity":"e-1","version":3}`)}
}

func read(t *testing.T, nc *nats.Conn, entity string) (*nats.Msg, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	return nc.RequestWithContext(ctx, kuma.EntitySubject(kuma.DefaultContext, kuma.OpRead, entity), []byte(`{}`))
}

func TestRelaysTheOwnersAnswer(t *testing.T) {
	r, nc := startRouter(t, nil)
	owner(t, nc, "e-1", func(_ int64, m *nats.Msg) *nats.Msg {
		h := nats.Header{}
		h.Set("Kuma-Test", "kept")
		return &nats.Msg{Header: h, Data: append([]byte("echo:"), m.Data...)}
	})
	msg, err := read(t, nc, "e-1")
	if err != nil {
		t.Fatal(err)
	}
	if string(msg.Data) != "echo:{}" || msg.Header.Get("Kuma-Test") != "kept" {
		t.Fatalf("answer %q headers %v, want the owner's body and headers", msg.Data, msg.Header)
	}
	if r.Forwarded() != 1 || r.Pending() != 0 {
		t.Fatalf("forwarded %d pending %d, want 1 and 0", r.Forwarded(), r.Pending())
	}
}

// TestHoldsARequestUntilTheOwnerSubscribes is the moving shard: nobody
// listens on its subject when the request comes; the owner subscribes a
// little later and the client gets its answer, not a timeout.
func TestHoldsARequestUntilTheOwnerSubscribes(t *testing.T) {
	r, nc := startRouter(t, nil)
	go func() {
		for r.Held() == 0 {
			time.Sleep(time.Millisecond)
		}
		owner(t, nc, "e-1", ok)
	}()
	msg, err := read(t, nc, "e-1")
	if err != nil {
		t.Fatal(err)
	}
	if rerr := natsbus.ReplyError(msg); rerr != nil {
		t.Fatalf("answer is an error: %v", rerr)
	}
	if r.Held() == 0 || r.Unavailable() != 0 {
		t.Fatalf("held %d unavailable %d, want some and 0", r.Held(), r.Unavailable())
	}
}

// TestRetriesAnOwnersUnavailable: an owner handing its shard off answers
// unavailable without doing the work; the router sends the request again
// and the client sees only the next owner's answer.
func TestRetriesAnOwnersUnavailable(t *testing.T) {
	r, nc := startRouter(t, nil)
	owner(t, nc, "e-1", func(n int64, m *nats.Msg) *nats.Msg {
		if n < 3 {
			return natsbus.ErrorMsg("", kuma.Errorf(kuma.CodeUnavailable, "shard 1 is stopping; retry"))
		}
		return ok(n, m)
	})
	msg, err := read(t, nc, "e-1")
	if err != nil {
		t.Fatal(err)
	}
	if rerr := natsbus.ReplyError(msg); rerr != nil {
		t.Fatalf("answer is an error: %v", rerr)
	}
	if r.Held() != 2 {
		t.Fatalf("held %d times, want 2", r.Held())
	}
}

// TestAnswersUnavailableWhenNoOwnerComes: after the hold time the client
// gets unavailable (retryable), not silence.
func TestAnswersUnavailableWhenNoOwnerComes(t *testing.T) {
	r, nc := startRouter(t, func(c *router.Config) { c.HoldFor = 50 * time.Millisecond })
	msg, err := read(t, nc, "e-1")
	if err != nil {
		t.Fatalf("want an unavailable answer, got %v", err)
	}
	if rerr := natsbus.ReplyError(msg); !errors.Is(rerr, kuma.ErrUnavailable) {
		t.Fatalf("answer error %v, want unavailable", rerr)
	}
	if r.Unavailable() != 1 || r.Pending() != 0 {
		t.Fatalf("unavailable %d pending %d, want 1 and 0", r.Unavailable(), r.Pending())
	}
}

// TestRefusesAReplyIntoReservedSubjects: a reply subject in the event
// stream's namespace gets nothing published there, and the owner never sees
// the request.
func TestRefusesAReplyIntoReservedSubjects(t *testing.T) {
	r, nc := startRouter(t, nil)
	var seen atomic.Int64
	owner(t, nc, "e-1", func(n int64, m *nats.Msg) *nats.Msg { seen.Add(1); return ok(n, m) })
	// A $JS.API reply is refused by nats-server itself from 2.15.3 on, so
	// it would never reach the router; a bucket's subject stands for the
	// JetStream namespace here (kuma.ReplyAllowed refuses both).
	for _, reply := range []string{"kuma.default.events.0", "_kuma.default.shard.0.read.x", "$KV.KUMA_KEYS.default.x"} {
		spy, err := nc.SubscribeSync(reply)
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.PublishRequest(kuma.EntitySubject(kuma.DefaultContext, kuma.OpRead, "e-1"), reply, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
		// The router handles one endpoint's requests in order: once a
		// later request is answered, the first one has been handled.
		if _, err := read(t, nc, "e-1"); err != nil {
			t.Fatal(err)
		}
		if m, err := spy.NextMsg(20 * time.Millisecond); err == nil {
			t.Fatalf("reply %s received %q", reply, m.Data)
		}
		_ = spy.Unsubscribe()
	}
	if r.Refused() != 3 || seen.Load() != 3 {
		t.Fatalf("refused %d, owner saw %d, want 3 and 3 (only the legitimate reads)", r.Refused(), seen.Load())
	}
}

// TestBoundsPendingRequests: with an owner that never answers, the router
// keeps at most MaxPending requests and answers the next unavailable.
func TestBoundsPendingRequests(t *testing.T) {
	r, nc := startRouter(t, func(c *router.Config) { c.MaxPending = 2 })
	owner(t, nc, "e-1", func(int64, *nats.Msg) *nats.Msg { return nil })
	for range 2 {
		if err := nc.PublishRequest(kuma.EntitySubject(kuma.DefaultContext, kuma.OpRead, "e-1"), nc.NewInbox(), []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	for r.Pending() < 2 {
		time.Sleep(time.Millisecond)
	}
	msg, err := read(t, nc, "e-1")
	if err != nil {
		t.Fatal(err)
	}
	if rerr := natsbus.ReplyError(msg); !errors.Is(rerr, kuma.ErrUnavailable) {
		t.Fatalf("third request: %v, want unavailable", rerr)
	}
}

// TestForgetsRequestsNeverAnswered: a request whose owner died holding it
// is dropped after MaxWait, so the pending count comes back down.
func TestForgetsRequestsNeverAnswered(t *testing.T) {
	r, nc := startRouter(t, func(c *router.Config) { c.MaxWait = 50 * time.Millisecond })
	owner(t, nc, "e-1", func(int64, *nats.Msg) *nats.Msg { return nil })
	if err := nc.PublishRequest(kuma.EntitySubject(kuma.DefaultContext, kuma.OpRead, "e-1"), nc.NewInbox(), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	for r.Forwarded() == 0 {
		time.Sleep(time.Millisecond)
	}
	for r.Pending() != 0 {
		time.Sleep(5 * time.Millisecond)
	}
}

// TestStopAnswersWhatIsLeft: requests still waiting when the router stops
// are answered unavailable, so their clients retry at once.
func TestStopAnswersWhatIsLeft(t *testing.T) {
	r, nc := startRouter(t, nil)
	owner(t, nc, "e-1", func(int64, *nats.Msg) *nats.Msg { return nil })
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.PublishRequest(kuma.EntitySubject(kuma.DefaultContext, kuma.OpRead, "e-1"), inbox, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	for r.Pending() == 0 {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := r.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	msg, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rerr := natsbus.ReplyError(msg); !errors.Is(rerr, kuma.ErrUnavailable) {
		t.Fatalf("answer %v, want unavailable", rerr)
	}
}

// TestAsksTheShardCountOnce: a router given no shard count answers
// unavailable while no shardnode tells it, and once one does, routes by
// that count, asking only once.
func TestAsksTheShardCountOnce(t *testing.T) {
	_, nc := startRouter(t, func(c *router.Config) {
		c.Contexts = map[string]int{kuma.DefaultContext: 0}
		c.HoldFor = 50 * time.Millisecond
	})
	msg, err := read(t, nc, "e-1")
	if err != nil {
		t.Fatalf("want an unavailable answer, got %v", err)
	}
	if rerr := natsbus.ReplyError(msg); !errors.Is(rerr, kuma.ErrUnavailable) {
		t.Fatalf("with no shardnode to tell the count: %v, want unavailable", rerr)
	}

	var asked atomic.Int64
	sub, err := nc.Subscribe(kuma.ShardCountSubject(kuma.DefaultContext), func(m *nats.Msg) {
		asked.Add(1)
		_ = m.Respond([]byte(fmt.Sprintf(`{"shards":%d}`, shards)))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	// owner listens where a count of shards puts the entity.
	owner(t, nc, "e-1", ok)
	for i := 0; i < 3; i++ {
		msg, err := read(t, nc, "e-1")
		if err != nil {
			t.Fatal(err)
		}
		if rerr := natsbus.ReplyError(msg); rerr != nil {
			t.Fatalf("read %d once a shardnode tells the count: %v", i, rerr)
		}
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("the count was asked %d times, want once", n)
	}
}

// TestAlikeFeedRequestsShareAPage: followers at the same place ask the
// same question at once; the shards are asked once for all of them, and
// each follower gets the page.
func TestAlikeFeedRequestsShareAPage(t *testing.T) {
	r, nc := startRouter(t, nil)
	var asked atomic.Int64
	for n := 0; n < shards; n++ {
		sub, err := nc.Subscribe(kuma.ShardFeedSubject(kuma.DefaultContext, n), func(m *nats.Msg) {
			asked.Add(1)
			time.Sleep(300 * time.Millisecond) // the followers' requests overlap
			page := kuma.ShardFeedPage{Next: 7}
			if n == 0 {
				page.Events = []kuma.ShardFeedEvent{{Time: 1, Seq: 7, JSON: []byte(`{"position":"p0.7"}`)}}
			}
			b, err := page.MarshalBinary()
			if err != nil {
				t.Error(err)
				return
			}
			_ = m.Respond(b)
		})
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	const followers = 10
	after := kuma.FeedCursor{Context: kuma.DefaultContext, After: make([]int64, shards)}.String()
	body := []byte(fmt.Sprintf(`{"after":%q,"limit":10}`, after))
	pages := make(chan string, followers)
	for i := 0; i < followers; i++ {
		go func() {
			msg, err := nc.Request(kuma.FeedSubject(kuma.DefaultContext), body, 10*time.Second)
			if err != nil {
				pages <- err.Error()
				return
			}
			pages <- string(msg.Data)
		}()
	}
	var first string
	for i := 0; i < followers; i++ {
		p := <-pages
		if !strings.Contains(p, `"p0.7"`) {
			t.Fatalf("follower %d got %s, want the page with p0.7", i, p)
		}
		if i == 0 {
			first = p
		} else if p != first {
			t.Fatalf("alike requests got different pages: %s and %s", first, p)
		}
	}
	// Requests that arrive after a page was made make their own: at most a
	// few rounds, never one per follower.
	if n := asked.Load(); n >= followers*shards/2 {
		t.Fatalf("the shards were asked %d times for %d alike requests: not shared", n, followers)
	} else {
		t.Logf("%d alike requests asked the %d shards %d times in all; %d pages shared", followers, shards, n, r.FeedShared())
	}
}
