//go:build cluster

package shardnode_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestFailedHandoffKeepsUnpublishedEvents: a hand-off that fails while its
// shard's file holds acknowledged events the stream refused (local
// durability) does not let the shard go: it serves the shard again, and if
// even that fails while the stream refuses, it keeps the lease and tries
// again until the stream takes writes. Before, a failed reopen released the
// lease to nobody, and the next owner took the shard from the stream
// without those events.
func TestFailedHandoffKeepsUnpublishedEvents(t *testing.T) {
	ctx := context.Background()
	logs1, logs2 := &corruptLog{}, &corruptLog{}
	n1 := corruptStart(t, t.TempDir(), logs1, func(c *app.Config) { c.NodeName = "n1" })
	c := n1.Client(client.Options{Timeout: 30 * time.Second})
	acked, byShard := corruptWriteAll(t, c, 4, 10, 100)
	corruptSettle(t, n1)

	nc, err := nats.Connect(n1.App.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	leases, err := js.KeyValue(ctx, cluster.LeasesBucket)
	if err != nil {
		t.Fatal(err)
	}
	pin := func(node string) {
		t.Helper()
		for shard := range corruptShards {
			if err := cluster.SetPin(ctx, leases, "default", shard, node); err != nil {
				t.Fatal(err)
			}
		}
	}
	// n2 joins with every shard pinned to n1: its start sets the streams'
	// configuration, which must happen before the refusals below.
	pin("n1")
	n2 := joinShardnode(t, "n2", t.TempDir(), n1.App.ClientURL(), logs2)

	// refuse makes a stream refuse every write (as one without a quorum
	// does, at once rather than by timing out), or take them again.
	was := map[string]int32{}
	refuse := func(name string, on bool) {
		t.Helper()
		st, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		cfg := st.CachedInfo().Config
		if on {
			was[name], cfg.MaxMsgSize = cfg.MaxMsgSize, 1
		} else {
			cfg.MaxMsgSize = was[name]
		}
		if _, err := js.UpdateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	events, snapshots := kuma.StreamName("default"), "OBJ_"+cluster.SnapshotsBucket
	refuse(events, true)
	// Acknowledged in the files only: the relay cannot publish them.
	for shard := range corruptShards {
		for _, e := range byShard[shard][:2] {
			if _, err := corruptAppend(ctx, c, acked, e, 5, 100); err != nil {
				t.Fatalf("append to %s while the stream refuses: %v", e, err)
			}
		}
	}
	refuse(snapshots, true) // a hand-off cannot upload its copy either
	pin("")                 // placement gives n2 its shards: n1 hands them off

	deadline := time.Now().Add(60 * time.Second)
	for len(logs1.lines("could not reopen the shard")) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no hand-off of n1 failed to reopen its shard within 60 s; n1's hand-offs:\n%s", strings.Join(logs1.lines("hand"), "\n"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(3 * time.Second) // a few more tries
	refuse(events, false)
	refuse(snapshots, false)

	settleShards(t, n1.Shardnode(), n2.Shardnode())
	if lines := logs1.lines("releasing it"); len(lines) > 0 {
		t.Errorf("n1 let a shard go whose file held events the stream lacked:\n%s", lines[0])
	}
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("after the failed hand-offs: %v", err)
	}
}
