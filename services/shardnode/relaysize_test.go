package shardnode_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go/jetstream"
)

// TestRelayBatchFitsTheMaxPayload: the relay packs the events that wait
// for it into one stream message. Under load many wait, and a batch sized
// by the relay's own limit (512 KiB) was refused by a server whose max
// payload is smaller ("maximum payload exceeded"), again and again: the
// shard's stream stopped, projections and replicas with it. The batch must
// fit the connection's max payload, whatever that is.
func TestRelayBatchFitsTheMaxPayload(t *testing.T) {
	const maxPayload = 128 << 10 // the smallest --max-payload allowed
	var hold sync.Mutex          // held: the relay waits before it publishes
	hold.Lock()
	released := false
	release := func() {
		if !released {
			released = true
			hold.Unlock()
		}
	}
	defer release()
	n := kumatest.Start(t, func(c *app.Config) {
		c.NATS.MaxPayload = maxPayload
		c.Shards = 1
		c.Failpoint = func(name string) {
			if name == "relay-before-publish" {
				hold.Lock()
				hold.Unlock() //nolint:staticcheck // a gate, not a critical section
			}
		}
	})
	c := n.Client(client.Options{})
	// 8 events of 40 KB: 320 KB of data, more once sealed and encoded,
	// committed while the relay is held, so they wait for it together.
	const events = 8
	for i := 0; i < events; i++ {
		data := json.RawMessage(fmt.Sprintf(`{"i":%d,"pad":"%s"}`, i, strings.Repeat("x", 40_000)))
		if _, err := c.Append(t.Context(), fmt.Sprintf("wide-%d", i), []kuma.EventInput{{Type: "Padded", Data: data}}); err != nil {
			t.Fatal(err)
		}
	}
	release()

	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, kuma.StreamName("default"))
	if err != nil {
		t.Fatal(err)
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	got, msgs := 0, 0
	for got < events {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("the stream holds %d of the %d events in %d messages, then nothing: %v", got, events, msgs, err)
		}
		if len(m.Data()) > maxPayload {
			t.Fatalf("a stream message of %d bytes, past the max payload %d", len(m.Data()), maxPayload)
		}
		var body kuma.StreamMessage
		format, err := kuma.ParseStreamFormat(m.Headers().Get(kuma.HeaderFormat))
		if err == nil {
			err = kuma.DecodeStreamMessageFormat(format, m.Data(), &body)
		}
		if err != nil {
			t.Fatal(err)
		}
		got += len(body.Events)
		msgs++
	}
	if msgs < 2 {
		t.Fatalf("%d events of 40 KB came in %d message under a %d-byte max payload", events, msgs, maxPayload)
	}
	t.Logf("%d events in %d stream messages", got, msgs)
}
