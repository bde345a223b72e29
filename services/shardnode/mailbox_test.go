package shardnode_test

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/app"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/kumatest"
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
	n := kumatest.Start(t, func(c *app.Config) { c.MailboxLen = 2 })
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
