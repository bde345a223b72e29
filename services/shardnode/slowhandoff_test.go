//go:build cluster

package shardnode_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
)

// TestSlowHandoffKeepsItsLease: a hand-off that takes longer than the
// lease (here held at one of its steps; in a cluster, a relay waiting on a
// stream that is growing to three replicas) keeps renewing the lease while
// it works, so that it finishes. Before, the shard left the control loop's
// renewals when its hand-off began: past the lease's deadline the upload's
// commit was fenced, the hand-off failed, the reopen under the stale lease
// failed too, and the lease was released to nobody, so that the next owner
// took the shard from an older snapshot (without the events the old owner
// had not yet published, under local durability).
func TestSlowHandoffKeepsItsLease(t *testing.T) {
	ctx := context.Background()
	logs1, logs2 := &corruptLog{}, &corruptLog{}
	var once sync.Once
	held := make(chan struct{})
	n1 := corruptStart(t, t.TempDir(), logs1, func(c *app.Config) {
		c.Failpoint = func(name string) {
			if name != "handoff-after-stop" {
				return
			}
			// The first hand-off waits past the lease's deadline (3/4
			// of its 6 s TTL), as a stalled stream makes it.
			once.Do(func() {
				close(held)
				time.Sleep(7 * time.Second)
			})
		}
	})
	c := n1.Client(client.Options{Timeout: 30 * time.Second})
	acked, _ := corruptWriteAll(t, c, 4, 10, 100)
	corruptSettle(t, n1)

	n2 := joinShardnode(t, "n2", t.TempDir(), n1.App.ClientURL(), logs2)
	select {
	case <-held:
	case <-time.After(60 * time.Second):
		t.Fatal("n1 handed nothing off to n2 within 60 s")
	}

	settleShards(t, n1.Shardnode(), n2.Shardnode())
	for _, bad := range []string{"hand-off failed", "could not reopen", "lease ran out"} {
		if lines := logs1.lines(bad); len(lines) > 0 {
			t.Errorf("n1 logged %q during a slow hand-off:\n%s", bad, lines[0])
		}
	}
	if lines := logs2.lines("shard taken", "epoch=2"); len(lines) == 0 {
		t.Errorf("n2 took no shard at the epoch after n1's (a hand-off); its takes:\n%q", logs2.lines("shard taken"))
	}
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("after the hand-offs: %v", err)
	}
}
