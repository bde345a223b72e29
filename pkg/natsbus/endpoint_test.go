package natsbus_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// TestJSONEndpoint: an answer goes back as JSON, an error with its
// protocol code, an answer over MaxReply as payload_too_large with the
// hint; Answered sees each outcome before the reply and the handler runs
// under its time limit.
func TestJSONEndpoint(t *testing.T) {
	srv := startMember(t, natsbus.ServerConfig{ServerName: "endpoint"})
	nc := connect(t, srv)
	svc, err := natsbus.AddService(nc, natsbus.ServiceConfig{Name: "kuma-test", Version: "1.0.0", QueueGroup: "kuma-test"})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Stop()
	var mu sync.Mutex
	var outcomes []string
	err = svc.AddEndpoint("answer", "test.answer.*", natsbus.JSONEndpoint{
		Answer: func(ctx context.Context, req micro.Request) (any, error) {
			if _, ok := ctx.Deadline(); !ok {
				return nil, kuma.Errorf(kuma.CodeInternal, "no time limit")
			}
			switch req.Subject() {
			case "test.answer.fail":
				return nil, kuma.Errorf(kuma.CodeVersionConflict, "asked to fail")
			case "test.answer.big":
				return map[string]string{"big": strings.Repeat("x", 200)}, nil
			}
			return map[string]string{"data": string(req.Data())}, nil
		},
		Timeout:  time.Second,
		MaxReply: 100,
		Hint:     "ask for a smaller one",
		Answered: func(req micro.Request, err error) {
			mu.Lock()
			defer mu.Unlock()
			outcomes = append(outcomes, req.Subject()+"="+natsbus.Code(err))
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	client := connect(t, srv)
	ask := func(subject, data string) *nats.Msg {
		t.Helper()
		msg, err := client.Request(subject, []byte(data), 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", subject, err)
		}
		return msg
	}
	if msg := ask("test.answer.ok", "hi"); string(msg.Data) != `{"data":"hi"}` || natsbus.ReplyError(msg) != nil {
		t.Fatalf("answer: %q, %v", msg.Data, natsbus.ReplyError(msg))
	}
	if err := natsbus.ReplyError(ask("test.answer.fail", "")); kuma.ErrorCode(err) != kuma.CodeVersionConflict {
		t.Fatalf("error: %v, want version_conflict", err)
	}
	err = natsbus.ReplyError(ask("test.answer.big", ""))
	if kuma.ErrorCode(err) != kuma.CodePayloadTooLarge || !strings.Contains(err.Error(), "ask for a smaller one") {
		t.Fatalf("a 200-byte answer over a 100-byte limit: %v, want payload_too_large with the hint", err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := "test.answer.ok=ok test.answer.fail=version_conflict test.answer.big=payload_too_large"
	if got := strings.Join(outcomes, " "); got != want {
		t.Fatalf("outcomes %q, want %q", got, want)
	}
}
