package shardnode_test

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
)

// TestStopDoesNotWaitOutAHungKeyvault: a request whose actor waits on the
// keyvault (a new entity's key) must not hold the node's stop up for the
// request's own 30 s time limit. That is what happens to the last node of a
// cluster stopped one node at a time: the shards of the nodes gone before it
// come to it, their actors fetch keys, and the keyvault's bucket has lost its
// quorum. The stop's budget is 6 s; past it, the requests in flight are
// answered unavailable and the shard closes.
func TestStopDoesNotWaitOutAHungKeyvault(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Keyvault = app.KeyvaultRemote })

	// A keyvault that takes every key request and answers none.
	hung, err := nats.Connect(n.App.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer hung.Close()
	var asked atomic.Int64
	if _, err := hung.QueueSubscribe(vaultclient.SubjectKey, "kuma-keyvault", func(*nats.Msg) { asked.Add(1) }); err != nil {
		t.Fatal(err)
	}
	if err := hung.Flush(); err != nil {
		t.Fatal(err)
	}

	body, _ := json.Marshal(kuma.AppendRequest{Events: []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"n":1}`)}}})
	answer := make(chan *nats.Msg, 1)
	go func() {
		msg, err := n.NC.Request(kuma.EntitySubject("default", "append", "stuck-1"), body, 60*time.Second)
		if err != nil {
			t.Logf("append: %v", err)
		}
		answer <- msg
	}()
	deadline := time.Now().Add(10 * time.Second)
	for asked.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the append never asked the keyvault for a key")
		}
		time.Sleep(10 * time.Millisecond)
	}

	a := n.App
	n.App = nil // stopped here, not by the cleanup
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- a.Stop(ctx) }()
	// The request's own limit is 30 s: a stop that waits it out is the bug.
	// 20 s leaves the 6 s budget ample room on a loaded machine.
	select {
	case err := <-stopped:
		t.Logf("stopped in %s with a key request unanswered (%v)", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(20 * time.Second):
		t.Fatalf("the stop still waits %s after it began: it waits out the request stuck on the keyvault", time.Since(start).Round(time.Second))
	}
	if msg := <-answer; msg != nil {
		var reply struct {
			Error *kuma.Error `json:"error"`
		}
		if err := json.Unmarshal(msg.Data, &reply); err != nil || reply.Error == nil {
			t.Fatalf("the append stuck on the keyvault was answered %s; want an error", msg.Data)
		}
		t.Logf("the append was answered %s", reply.Error.Code)
	}
	n.NC.Close()
}
