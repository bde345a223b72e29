package main

// Issue 17, item 1: a forget deletes an entity's rows, and when those were
// the shard's last positions a restart used to find the file "behind" the
// event stream, declare the shard corrupt and answer internal for every
// entity on it (and, had it gone on, hand out positions the stream already
// held). These run a real `kuma up`, forget, stop it with SIGTERM and start
// it again on the same data.

import (
	"context"
	"encoding/json"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
)

// forgetEntityOn returns an entity id that lands on shard, named after tag.
func forgetEntityOn(tag string, shard, shards int) string {
	for i := 0; ; i++ {
		if id := fmt.Sprintf("%s-%d", tag, i); placement.ShardOf(id, shards) == shard {
			return id
		}
	}
}

// term stops the node with SIGTERM and requires a clean exit.
func (n *crashNode) term() {
	n.t.Helper()
	if err := n.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		n.t.Fatal(err)
	}
	if err := n.p.cmd.Wait(); err != nil {
		n.t.Fatalf("kuma up after SIGTERM: %v\n%s", err, tail(n.p.logs.String(), 40))
	}
}

// forgetAppend appends n events to entity and returns the shard position of
// the last one.
func forgetAppend(ctx context.Context, t *testing.T, c *client.Client, entity string, n int) int64 {
	t.Helper()
	var last int64
	for i := range n {
		rep, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Noted", Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))}})
		if err != nil {
			t.Fatalf("append to %s: %v", entity, err)
		}
		p, err := kuma.ParsePosition(rep.Position)
		if err != nil {
			t.Fatal(err)
		}
		last = p.Seq
	}
	return last
}

// forgetCheckForgotten requires every operation on entity to answer
// entity_forgotten.
func forgetCheckForgotten(ctx context.Context, t *testing.T, c *client.Client, entity string) {
	t.Helper()
	_, rerr := c.Read(ctx, entity)
	_, aerr := c.Append(ctx, entity, []kuma.EventInput{{Type: "Back"}})
	for op, err := range map[string]error{"read": rerr, "append": aerr} {
		if kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
			t.Fatalf("%s of forgotten %s after restart: %v, want entity_forgotten", op, entity, err)
		}
	}
}

// forgetCheckServes requires the shard to take a new entity at a position
// after every one it handed out before the restart.
func forgetCheckServes(ctx context.Context, t *testing.T, c *client.Client, shard int, before int64) {
	t.Helper()
	id := forgetEntityOn("after-restart", shard, crashShards)
	if got := forgetAppend(ctx, t, c, id, 1); got <= before {
		t.Fatalf("shard %d: a new append after the restart got position %d, but %d was handed out before: a position was reused", shard, got, before)
	}
}

func TestForgetThenRestartKeepsShardInService(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	n := crashStartNode(t, "FULL")
	c, err := client.New(connect(t, n.url()), client.Options{Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// One shard per case: which of its entities (written in this order,
	// two events each) are forgotten.
	cases := []struct {
		name    string
		written []string
		forget  []string
	}{
		{"only", []string{"a"}, []string{"a"}},
		{"last", []string{"a", "b"}, []string{"b"}},
		{"middle", []string{"a", "b", "c"}, []string{"b"}},
		{"every", []string{"a", "b", "c"}, []string{"b", "c", "a"}},
	}
	last := make([]int64, crashShards)
	id := func(shard int, name string) string { return forgetEntityOn("fr-"+name, shard, crashShards) }
	for shard, tc := range cases {
		for _, e := range tc.written {
			last[shard] = forgetAppend(ctx, t, c, id(shard, e), 2)
		}
		for _, e := range tc.forget {
			if _, err := c.Forget(ctx, id(shard, e), "restart test", "test"); err != nil {
				t.Fatalf("forget %s (%s): %v", id(shard, e), tc.name, err)
			}
		}
	}

	n.term()
	n.restart(time.Now())

	for shard, tc := range cases {
		forgotten := map[string]bool{}
		for _, e := range tc.forget {
			forgotten[e] = true
			forgetCheckForgotten(ctx, t, c, id(shard, e))
		}
		for _, e := range tc.written {
			if forgotten[e] {
				continue
			}
			r, err := c.Read(ctx, id(shard, e))
			if err != nil || r.Version != 2 {
				t.Fatalf("%s: read of %s after restart: %+v, %v\n%s", tc.name, id(shard, e), r, err, tail(n.p.logs.String(), 30))
			}
		}
		forgetCheckServes(ctx, t, c, shard, last[shard])
	}
}

// TestForgetThenRestartUnderLoad forgets while writers append, then stops
// and restarts the node under that load: no acknowledged event is lost, the
// forgotten stay forgotten, and a shard the load does not write to (whose
// last positions were the forgotten entity's) serves after the restart.
func TestForgetThenRestartUnderLoad(t *testing.T) {
	const writers = 3
	covered := map[int]bool{}
	for w := range writers {
		covered[placement.ShardOf(fmt.Sprintf("w-%03d", w), crashShards)] = true
	}
	if len(covered) == crashShards {
		t.Fatalf("the load covers every shard; the test needs one it does not write to")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	n := crashStartNode(t, "FULL")
	nc := connect(t, n.url())
	c, err := client.New(nc, client.Options{Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	l := startLoad(t, nc, loadConfig{writers: writers, shards: crashShards, attempt: crashAttempt})
	l.waitAcks(t, 30, time.Minute)

	last := make([]int64, crashShards)
	var gone []string
	for shard := range crashShards {
		e := forgetEntityOn("fl", shard, crashShards)
		last[shard] = forgetAppend(ctx, t, c, e, 2)
		if _, err := c.Forget(ctx, e, "restart under load", "test"); err != nil {
			t.Fatalf("forget %s: %v", e, err)
		}
		gone = append(gone, e)
	}
	l.waitAcks(t, 30, time.Minute)

	n.term()
	l.interrupt()
	n.restart(time.Now())
	l.waitAcks(t, 60, time.Minute)
	l.finish()
	if got := l.verify(t); got == 0 {
		t.Fatal("the load acknowledged nothing")
	}
	for _, e := range gone {
		forgetCheckForgotten(ctx, t, c, e)
	}
	for shard := range crashShards {
		if !covered[shard] {
			forgetCheckServes(ctx, t, c, shard, last[shard])
		}
	}
}
