package shardnode_test

import (
	"context"
	"encoding/json"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go"
)

// TestFullMailboxIsRefusedNotWaitedOn sends a burst of appends for one hot
// entity straight to its shard (past the router, which would resend), with
// mailboxes of 2: the requests beyond what its actor holds are answered
// unavailable at once, and another entity of the same shard is served
// meanwhile, since the shard's callback never waits on the hot entity.
func TestFullMailboxIsRefusedNotWaitedOn(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Shardnode.MailboxLen = 2 })
	const burst = 300
	hot := "hot-meter"
	shard := placement.ShardOf(hot, n.Cfg.Shards)
	other := ""
	for i := 0; other == ""; i++ {
		if id := "cold-" + strconv.Itoa(i); placement.ShardOf(id, n.Cfg.Shards) == shard {
			other = id
		}
	}
	body := []byte(`{"events":[{"type":"Tick","data":{"n":1}}]}`)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var mu sync.Mutex
	codes := map[string]int{}
	var wg sync.WaitGroup
	for range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code := "ok"
			err := shardRequest(ctx, n, kuma.ShardSubject("default", shard, kuma.OpAppend, hot), body, nil)
			if err != nil {
				code = string(kuma.ErrorCode(err))
			}
			mu.Lock()
			codes[code]++
			mu.Unlock()
		}()
	}
	// The neighbour on the same shard, during the burst.
	otherErr := shardRequest(ctx, n, kuma.ShardSubject("default", shard, kuma.OpAppend, other), body, nil)
	wg.Wait()
	t.Logf("%d appends to one entity with a mailbox of 2: %v", burst, codes)
	if otherErr != nil {
		t.Fatalf("an append to %s on the same shard failed during the burst: %v", other, otherErr)
	}
	if codes["ok"] == 0 || codes[string(kuma.CodeUnavailable)] == 0 || codes["ok"]+codes[string(kuma.CodeUnavailable)] != burst {
		t.Fatalf("answers %v: want some ok, some unavailable, nothing else", codes)
	}
	// What was refused was not stored: the entity holds exactly the
	// acknowledged appends.
	var r kuma.ReadReply
	if err := shardRequest(ctx, n, kuma.ShardSubject("default", shard, kuma.OpRead, hot), []byte(`{}`), &r); err != nil {
		t.Fatal(err)
	}
	if r.Version != int64(codes["ok"]) {
		t.Fatalf("version %d after %d acknowledged appends", r.Version, codes["ok"])
	}
}

// shardRequest sends body to a shard subject and decodes the reply into out
// (when not nil), or returns the reply's protocol error.
func shardRequest(ctx context.Context, n *kumatest.Node, subject string, body []byte, out any) error {
	msg, err := n.NC.RequestMsgWithContext(ctx, &nats.Msg{Subject: subject, Data: body})
	if err != nil {
		return err
	}
	if err := natsbus.ReplyError(msg); err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	return kuma.Decode(msg.Data, out)
}

// TestIdleActorsHoldNoGoroutine: an actor's goroutine runs only while it has
// requests, so a thousand live but idle entities cost no goroutines (each
// would hold a stack of 8 KiB or more), and their state still answers.
func TestIdleActorsHoldNoGoroutine(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{NoAutoIdempotencyKey: true})
	ctx := t.Context()
	ev := []kuma.EventInput{{Type: "Seen", Data: json.RawMessage(`{"n":1}`)}}
	if _, err := c.Append(ctx, "warm-up", ev); err != nil {
		t.Fatal(err)
	}
	const entities = 1000
	before := runtime.NumGoroutine()
	var wg sync.WaitGroup
	for w := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < entities; i += 10 {
				if _, err := c.Append(ctx, "idle-"+strconv.Itoa(i), ev); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	live := 0
	for _, s := range n.Shardnode().Stats() {
		live += s.LiveActors
	}
	if live < entities {
		t.Fatalf("%d live actors after writing %d entities: they were passivated, the test shows nothing", live, entities)
	}
	// The last goroutines end just after their reply; give them a moment.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before+50 {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines with %d idle live actors, %d before them", runtime.NumGoroutine(), live, before)
		}
		time.Sleep(10 * time.Millisecond)
	}
	var r kuma.ReadReply
	if err := shardRequest(ctx, n, kuma.ShardSubject("default", placement.ShardOf("idle-7", n.Cfg.Shards), kuma.OpRead, "idle-7"), []byte(`{}`), &r); err != nil || r.Version != 1 {
		t.Fatalf("read of an idle live entity: version %d, %v", r.Version, err)
	}
}
