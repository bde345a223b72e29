package app_test

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/kumatest"
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
