package natsbus_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// TestServiceSpeaksMicro: what `nats micro ping|info|stats` and a client see
// of a Service is what they saw of a micro service: the discovery answers
// in micro's types, endpoints in the queue group, errors in micro's headers
// and counted in STATS.
func TestServiceSpeaksMicro(t *testing.T) {
	srv := startMember(t, natsbus.ServerConfig{ServerName: "svc"})
	nc := connect(t, srv)
	svc, err := natsbus.AddService(nc, natsbus.ServiceConfig{Name: "kuma-test", Version: "1.2.3", Description: "a test", QueueGroup: "kuma-test"})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Stop()
	err = svc.AddEndpoint("echo", "test.echo.*", micro.HandlerFunc(func(req micro.Request) {
		if string(req.Data()) == "fail" {
			_ = natsbus.MicroError(req, kuma.Errorf(kuma.CodeBadRequest, "asked to fail"))
			return
		}
		_ = req.RespondJSON(map[string]string{"subject": req.Subject(), "data": string(req.Data())})
	}))
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	client := connect(t, srv)
	msg, err := client.Request("test.echo.a", []byte("hi"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if string(msg.Data) != `{"data":"hi","subject":"test.echo.a"}` {
		t.Fatalf("echo: %q", msg.Data)
	}
	msg, err = client.Request("test.echo.b", []byte("fail"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := natsbus.ReplyError(msg); kuma.ErrorCode(got) != kuma.CodeBadRequest || msg.Header.Get(micro.ErrorCodeHeader) != "400" {
		t.Fatalf("error reply: %v, headers %v; want bad_request with code 400", got, msg.Header)
	}

	var ping micro.Ping
	request(t, client, "$SRV.PING", &ping)
	if ping.Name != "kuma-test" || ping.Version != "1.2.3" || ping.Type != micro.PingResponseType || ping.ID == "" {
		t.Fatalf("ping: %+v", ping)
	}
	var info micro.Info
	request(t, client, "$SRV.INFO.kuma-test."+ping.ID, &info)
	if info.Description != "a test" || len(info.Endpoints) != 1 || info.Endpoints[0].Subject != "test.echo.*" || info.Endpoints[0].QueueGroup != "kuma-test" {
		t.Fatalf("info: %+v", info)
	}
	var stats micro.Stats
	request(t, client, "$SRV.STATS.kuma-test", &stats)
	if len(stats.Endpoints) != 1 {
		t.Fatalf("stats: %+v", stats)
	}
	if e := stats.Endpoints[0]; e.Name != "echo" || e.NumRequests != 2 || e.NumErrors != 1 || e.LastError == "" {
		t.Fatalf("endpoint stats: %+v; want 2 requests, 1 error", e)
	}

	if err := svc.Stop(); err != nil {
		t.Fatal(err)
	}
	// Stop drains: the unsubscriptions reach the server soon after.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	eventually(ctx, t, "no answer to a ping after Stop", func() bool {
		_, err := client.Request("$SRV.PING.kuma-test", nil, time.Second)
		return errors.Is(err, nats.ErrNoResponders)
	})
}

// TestServiceRefusesReservedReplies: no request, discovery or endpoint,
// gets an answer on a reply subject in a reserved namespace; Refused hears
// of each, and the handler never runs.
func TestServiceRefusesReservedReplies(t *testing.T) {
	srv := startMember(t, natsbus.ServerConfig{ServerName: "svc"})
	nc := connect(t, srv)
	var mu sync.Mutex
	var refused []string
	svc, err := natsbus.AddService(nc, natsbus.ServiceConfig{Name: "kuma-test", Version: "1.0.0", QueueGroup: "q",
		Refused: func(subject, reply string) { mu.Lock(); refused = append(refused, subject+" "+reply); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Stop()
	var handled sync.WaitGroup
	calls := 0
	if err := svc.AddEndpoint("e", "test.e", micro.HandlerFunc(func(req micro.Request) {
		calls++
		_ = req.Respond([]byte("answer"))
		handled.Done()
	})); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	client := connect(t, srv)
	leaked := make(chan *nats.Msg, 256)
	// Not "$JS.API.…": nats-server 2.15.3 and later refuse a client's
	// publish with a $JS. reply themselves, so it never reaches the
	// service; kuma.ReplyAllowed refuses it too (pkg/kuma's subjects test),
	// for servers that do not.
	reserved := []string{"kuma.default.events.0", "kuma.default.events.0.forgotten", "_kuma.x", "$KV.b.k", "$O.b.k", "$SYS.REQ.X"}
	for _, r := range reserved {
		sub, err := client.ChanSubscribe(r, leaked)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
	}
	subjects := []string{"$SRV.PING", "$SRV.INFO.kuma-test", "$SRV.STATS.kuma-test", "test.e"}
	for _, s := range subjects {
		for _, r := range reserved {
			if err := client.PublishRequest(s, r, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Then each once legitimately: answered, and after the others.
	handled.Add(1)
	for _, s := range subjects {
		if _, err := client.Request(s, nil, 5*time.Second); err != nil {
			t.Fatalf("%s with an inbox: %v", s, err)
		}
	}
	handled.Wait()
	if err := client.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-leaked:
		t.Fatalf("answered into %s: %q", m.Subject, m.Data)
	default:
	}
	mu.Lock()
	defer mu.Unlock()
	if len(refused) != len(subjects)*len(reserved) || calls != 1 {
		t.Fatalf("refused %d (%v), handler ran %d times; want %d refused and 1 run", len(refused), refused, calls, len(subjects)*len(reserved))
	}
}

func request(t *testing.T, nc *nats.Conn, subject string, out any) {
	t.Helper()
	msg, err := nc.Request(subject, nil, 5*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", subject, err)
	}
	if err := json.Unmarshal(msg.Data, out); err != nil {
		t.Fatalf("%s: %q: %v", subject, msg.Data, err)
	}
}

// TestServiceConcurrency: with Concurrency, a request whose handler waits
// does not hold up the ones behind it (each handler here waits until every
// request has arrived, which one-at-a-time handling never reaches), and the
// stats still count every request.
func TestServiceConcurrency(t *testing.T) {
	srv := startMember(t, natsbus.ServerConfig{ServerName: "svc"})
	nc := connect(t, srv)
	svc, err := natsbus.AddService(nc, natsbus.ServiceConfig{Name: "kuma-test", Version: "1.0.0", QueueGroup: "kuma-test", Concurrency: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	const n = 4
	var arrived sync.WaitGroup
	arrived.Add(n)
	all := make(chan struct{})
	go func() { arrived.Wait(); close(all) }()
	err = svc.AddEndpoint("wait", "test.wait", micro.HandlerFunc(func(req micro.Request) {
		arrived.Done()
		select {
		case <-all:
			_ = req.Respond([]byte("ok"))
		case <-time.After(5 * time.Second):
			_ = req.Respond([]byte("alone"))
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			msg, err := nc.Request("test.wait", nil, 10*time.Second)
			if err != nil || string(msg.Data) != "ok" {
				t.Errorf("request: got %v, %v; want ok (handled beside the others)", msg, err)
			}
		})
	}
	wg.Wait()
	// A handler counts its request after it has answered.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	eventually(ctx, t, "stats count every request", func() bool { return svc.Stats().Endpoints[0].NumRequests == n })
}
