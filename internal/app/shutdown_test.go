package app_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// TestStopUnderLoadLosesNoAcknowledgedEvent stops the node while 50 writers
// append: every append acknowledged before the stop is there after a restart,
// with dense versions, and nothing unacknowledged slipped in twice.
func TestStopUnderLoadLosesNoAcknowledgedEvent(t *testing.T) {
	n := kumatest.Start(t, nil)
	// The writers' own connection, so that the node's stop (not a closed
	// client) is what they run into.
	nc, err := nats.Connect(n.App.ClientURL(), nats.NoReconnect(), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c, err := client.New(nc, client.Options{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	acked := map[string]int64{} // entity → highest acknowledged version
	var stop atomic.Bool
	var ackCount atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 50; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			entity := fmt.Sprintf("w-%d", w)
			for i := 0; !stop.Load(); i++ {
				rep, err := c.Append(context.Background(), entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}})
				if err != nil {
					return // the node is going away
				}
				ackCount.Add(1)
				mu.Lock()
				acked[entity] = max(acked[entity], rep.LastVersion)
				mu.Unlock()
			}
		}(w)
	}
	for ackCount.Load() < 500 {
		time.Sleep(5 * time.Millisecond)
	}
	n.Stop()
	stop.Store(true)
	wg.Wait()

	n.Restart()
	c = n.Client(client.Options{})
	for entity, v := range acked {
		events := readAll(t, c, entity)
		if int64(len(events)) < v {
			t.Fatalf("%s: %d events after restart, version %d was acknowledged", entity, len(events), v)
		}
		// At most one unacknowledged append per writer may have committed
		// (its reply lost in the stop); never more, never a gap.
		if int64(len(events)) > v+1 {
			t.Fatalf("%s: %d events, only %d acknowledged", entity, len(events), v)
		}
		for i, e := range events {
			if e.Version != int64(i+1) {
				t.Fatalf("%s: version gap at %d", entity, i)
			}
		}
	}
	t.Logf("%d acknowledged appends survived the stop", ackCount.Load())
}
