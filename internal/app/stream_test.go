package app_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestRelayPublishesEveryEventOnceInOrder appends from many writers and
// checks that the stream holds every event once, per entity in version
// order, with sealed payloads; and that a restart publishes nothing twice.
func TestRelayPublishesEveryEventOnceInOrder(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	total := 0
	for w := 0; w < 20; w++ {
		for i := 0; i < 10; i++ {
			batch := markerEvents(1 + (w+i)%4)
			if _, err := c.Append(t.Context(), fmt.Sprintf("s-%d", (w*7+i)%30), batch); err != nil {
				t.Fatal(err)
			}
			total += len(batch)
		}
	}
	check := func(events map[string][]kuma.StreamEvent) {
		t.Helper()
		sum := 0
		for entity, evs := range events {
			for i, e := range evs {
				if e.Version != int64(i+1) {
					t.Fatalf("%s: stream event %d has version %d; want every version once, in order", entity, i, e.Version)
				}
				if len(e.Payload) == 0 || json.Valid(e.Payload) {
					t.Fatalf("%s v%d: payload is not sealed: %q", entity, e.Version, e.Payload)
				}
			}
			sum += len(evs)
		}
		if sum != total {
			t.Fatalf("the stream holds %d events, %d were appended", sum, total)
		}
	}
	check(kumatest.StreamEvents(t, n.NC, "default", total))
	n.Restart() // resumes from the stream: nothing republished
	c = n.Client(client.Options{})
	if _, err := c.Append(t.Context(), "s-1", markerEvents(2)); err != nil {
		t.Fatal(err)
	}
	total += 2
	check(kumatest.StreamEvents(t, n.NC, "default", total))
}

// TestStatusShowsTheShardMapAndRelayLag reads kuma.<ctx>.status over raw
// NATS: every shard owned, counts equal to what was written, and the relay
// caught up.
func TestStatusShowsTheShardMapAndRelayLag(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.NodeName = "node-a" })
	c := n.Client(client.Options{})
	for i := 0; i < 40; i++ {
		if _, err := c.Append(t.Context(), fmt.Sprintf("st-%d", i%10), markerEvents(2)); err != nil {
			t.Fatal(err)
		}
	}
	kumatest.StreamEvents(t, n.NC, "default", 80) // the relay has caught up
	var st kuma.StatusReply
	for try := 0; ; try++ {
		wantOK(t, request(t, n.NC, "kuma.default.status", ""), &st)
		var events, entities, lag int64
		for _, s := range st.Shards {
			events += s.Events
			entities += s.Entities
			lag += s.RelayLag
			if s.Owner != "node-a" {
				t.Fatalf("shard %d owned by %q, want node-a", s.Shard, s.Owner)
			}
		}
		if len(st.Shards) != n.Cfg.Shards || events != 80 || entities != 10 || len(st.Nodes) != 1 {
			t.Fatalf("status = %+v; want %d shards, 80 events, 10 entities, 1 node", st, n.Cfg.Shards)
		}
		if lag == 0 {
			break
		}
		if try > 100 {
			t.Fatalf("relay lag stays at %d", lag)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
