package natsbus_test

import (
	"context"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// TestBroadcastEndpointAndGather: every instance of a service answers a
// broadcast endpoint, Gather collects them all and ends as soon as enough
// says so (or at its deadline), and a reserved reply subject is refused
// there as on any endpoint.
func TestBroadcastEndpointAndGather(t *testing.T) {
	srv := startMember(t, natsbus.ServerConfig{ServerName: "gather"})
	var refused atomic.Int32
	for _, name := range []string{"a", "b", "c"} {
		nc := connect(t, srv)
		svc, err := natsbus.AddService(nc, natsbus.ServiceConfig{Name: "kuma-test", Version: "1.0.0", QueueGroup: "kuma-test",
			Refused: func(string, string) { refused.Add(1) }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = svc.Stop() })
		if err := svc.AddBroadcastEndpoint("all", "test.all", micro.HandlerFunc(func(req micro.Request) {
			_ = req.Respond([]byte(name))
		})); err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		if qg := svc.Info().Endpoints[0].QueueGroup; qg != "" {
			t.Fatalf("a broadcast endpoint in queue group %q", qg)
		}
	}
	client := connect(t, srv)
	answers := func(msgs []*nats.Msg) []string {
		var out []string
		for _, m := range msgs {
			out = append(out, string(m.Data))
		}
		sort.Strings(out)
		return out
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	got, err := natsbus.Gather(ctx, client, &nats.Msg{Subject: "test.all"}, func(got []*nats.Msg) bool { return len(got) == 3 })
	if err != nil {
		t.Fatal(err)
	}
	if a := answers(got); len(a) != 3 || a[0] != "a" || a[1] != "b" || a[2] != "c" {
		t.Fatalf("gathered %v; want a b c", a)
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Fatalf("gather took %s: it waited for its deadline although every instance had answered", took)
	}

	// With enough never satisfied, the deadline ends it with what came.
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	got, err = natsbus.Gather(short, client, &nats.Msg{Subject: "test.all"}, func(got []*nats.Msg) bool { return len(got) == 4 })
	if err != nil || len(got) != 3 {
		t.Fatalf("gather to the deadline: %d answers, %v; want 3", len(got), err)
	}

	// No subscriber: no-responders ends it at once, with nothing.
	none, cancel3 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel3()
	start = time.Now()
	got, err = natsbus.Gather(none, client, &nats.Msg{Subject: "test.nobody"}, nil)
	if err != nil || len(got) != 0 || time.Since(start) > 2*time.Second {
		t.Fatalf("gather with no subscriber: %d answers, %v after %s", len(got), err, time.Since(start))
	}

	// A reserved reply subject is dropped by every instance, unanswered.
	watch, err := client.SubscribeSync("kuma.x.events.0")
	if err != nil {
		t.Fatal(err)
	}
	if err := client.PublishRequest("test.all", "kuma.x.events.0", nil); err != nil {
		t.Fatal(err)
	}
	if m, err := watch.NextMsg(300 * time.Millisecond); err == nil {
		t.Fatalf("an answer went to the reserved subject: %q", m.Data)
	}
	if n := refused.Load(); n != 3 {
		t.Fatalf("%d instances refused the reserved reply subject; want 3", n)
	}
}
