package client_test

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// collect subscribes and gathers events until want arrived.
func collect(t *testing.T, c *client.Client, opts client.SubscribeOptions, want int) []client.Event {
	t.Helper()
	var mu sync.Mutex
	var got []client.Event
	enough := make(chan struct{})
	sub, err := c.Subscribe(t.Context(), opts, func(e client.Event) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, e)
		if len(got) == want {
			close(enough)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Stop()
	select {
	case <-enough:
	case <-sub.Done():
		t.Fatalf("subscription ended: %v", sub.Err())
	case <-time.After(20 * time.Second):
		mu.Lock()
		t.Fatalf("got %d events, want %d", len(got), want)
	}
	time.Sleep(50 * time.Millisecond) // nothing more may arrive
	mu.Lock()
	defer mu.Unlock()
	if len(got) != want {
		t.Fatalf("got %d events, want exactly %d", len(got), want)
	}
	return append([]client.Event(nil), got...)
}

func TestSubscribeOpensEventsInOrder(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{DirectShards: n.Cfg.Shards})
	var mid string
	for i := 0; i < 30; i++ {
		rep, err := c.Append(t.Context(), fmt.Sprintf("sub-%d", i%5), []kuma.EventInput{
			{Type: "Counted", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}})
		if err != nil {
			t.Fatal(err)
		}
		if i == 14 && i%5 == 4 {
			mid = rep.Position
		}
	}

	all := collect(t, c, client.SubscribeOptions{}, 30)
	versions := map[string]int64{}
	for _, e := range all {
		if e.Type != "Counted" || len(e.Data) == 0 {
			t.Fatalf("event not opened: %+v", e)
		}
		if e.Version != versions[e.Entity]+1 {
			t.Fatalf("%s: version %d after %d", e.Entity, e.Version, versions[e.Entity])
		}
		versions[e.Entity] = e.Version
	}

	one := collect(t, c, client.SubscribeOptions{Entity: "sub-4"}, 6)
	for i, e := range one {
		if e.Entity != "sub-4" || e.Version != int64(i+1) {
			t.Fatalf("entity subscription delivered %+v at %d", e, i)
		}
	}
	// After a position: sub-4's events after its third (i = 14).
	later := collect(t, c, client.SubscribeOptions{Entity: "sub-4", After: mid}, 3)
	if later[0].Version != 4 {
		t.Fatalf("after %s the first event is version %d, want 4", mid, later[0].Version)
	}

	// A subscription of one shard from a position.
	p, err := kuma.ParsePosition(mid)
	if err != nil {
		t.Fatal(err)
	}
	var inShard int
	for _, e := range all {
		if q, _ := kuma.ParsePosition(e.Position); q.Shard == p.Shard && q.Seq > p.Seq {
			inShard++
		}
	}
	for _, e := range collect(t, c, client.SubscribeOptions{Shard: &p.Shard, After: mid}, inShard) {
		if q, _ := kuma.ParsePosition(e.Position); q.Shard != p.Shard || q.Seq <= p.Seq {
			t.Fatalf("a subscription of shard %d after %s delivered %+v", p.Shard, mid, e)
		}
	}

	// A forgotten entity's events never come, even those before the forget.
	if _, err := c.Forget(t.Context(), "sub-0", "test", "subscribe_test"); err != nil {
		t.Fatal(err)
	}
	for _, e := range collect(t, c, client.SubscribeOptions{}, 24) {
		if e.Entity == "sub-0" || e.Type != "Counted" {
			t.Fatalf("after the forget, delivered %+v", e)
		}
	}
	if _, err := c.Subscribe(t.Context(), client.SubscribeOptions{After: "nonsense"}, func(client.Event) error { return nil }); kuma.ErrorCode(err) != kuma.CodeBadRequest {
		t.Fatalf("bad position = %v, want bad_request", err)
	}
}

func TestSubscribeHandlerErrorEndsIt(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	for i := 0; i < 3; i++ {
		if _, err := c.Append(t.Context(), "h", []kuma.EventInput{{Type: "E"}}); err != nil {
			t.Fatal(err)
		}
	}
	calls := 0
	boom := fmt.Errorf("boom")
	sub, err := c.Subscribe(t.Context(), client.SubscribeOptions{}, func(client.Event) error { calls++; return boom })
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-sub.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("a failing handler did not end the subscription")
	}
	if sub.Err() != boom || calls != 1 {
		t.Fatalf("Err = %v after %d calls, want boom after 1", sub.Err(), calls)
	}
}
