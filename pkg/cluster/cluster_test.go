package cluster_test

import (
	"errors"
	"testing"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kumatest"
	"github.com/nats-io/nats.go/jetstream"
)

// TestRendezvousMovesOnlyToNewcomers: going from three nodes to five, a
// shard either stays or moves to one of the two new nodes (never between
// old ones), and about 2/5 of the shards move.
func TestRendezvousMovesOnlyToNewcomers(t *testing.T) {
	const shards = 4096
	before := []string{"n1", "n2", "n3"}
	after := append(append([]string(nil), before...), "n4", "n5")
	moved := 0
	for s := range shards {
		a, b := cluster.Rendezvous("default", s, before), cluster.Rendezvous("default", s, after)
		if a == b {
			continue
		}
		moved++
		if b != "n4" && b != "n5" {
			t.Fatalf("shard %d moved from %s to %s, an old node", s, a, b)
		}
	}
	if f := float64(moved) / shards; f < 0.35 || f > 0.45 {
		t.Fatalf("%.3f of the shards moved, want about 0.4", f)
	}
	if got := cluster.Rendezvous("default", 7, nil); got != "" {
		t.Fatalf("no nodes: %q, want none", got)
	}
}

func open(t *testing.T, js jetstream.JetStream, node string) *cluster.Store {
	t.Helper()
	s, err := cluster.Open(t.Context(), js, cluster.Config{Node: node})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// TestLeaseCompareAndSet: a lease changes only from the revision its writer
// read; a stale holder's renewal is a conflict; a release keeps whether
// the owner got to serve, and the next owner takes the next epoch.
func TestLeaseCompareAndSet(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	a, b := open(t, js, "a"), open(t, js, "b")
	la, err := a.Acquire(t.Context(), "default", 3, nil, 1)
	if err != nil || la.Owner != "a" || la.Epoch != 1 || la.Serving {
		t.Fatalf("first acquire: %+v %v", la, err)
	}
	if _, err := b.Acquire(t.Context(), "default", 3, nil, 1); !errors.Is(err, cluster.ErrConflict) {
		t.Fatalf("second create of the same lease: %v, want a conflict", err)
	}
	served, err := a.Serve(t.Context(), la)
	if err != nil || !served.Serving || served.Epoch != 1 || served.Revision <= la.Revision {
		t.Fatalf("serve: %+v %v", served, err)
	}
	if _, err := a.Renew(t.Context(), la); !errors.Is(err, cluster.ErrConflict) {
		t.Fatalf("renew from a stale revision: %v, want a conflict", err)
	}
	rel, err := a.Release(t.Context(), served, "b")
	if err != nil || rel.Owner != "" || rel.HandoffTo != "b" || !rel.Serving {
		t.Fatalf("release: %+v %v (want no owner, hand-off to b, serving kept)", rel, err)
	}
	lb, err := b.Acquire(t.Context(), "default", 3, &rel, 1)
	if err != nil || lb.Owner != "b" || lb.Epoch != 2 || lb.Serving || lb.HandoffTo != "" {
		t.Fatalf("take over: %+v %v (want b at epoch 2, not yet serving)", lb, err)
	}
	// The old owner's view of its lease is now stale: it cannot renew.
	if _, err := a.Renew(t.Context(), served); !errors.Is(err, cluster.ErrConflict) {
		t.Fatalf("old owner's renewal after the take-over: %v, want a conflict", err)
	}
	if err := cluster.ValidateNode("bad.name"); err == nil {
		t.Fatal("a node name with a dot was accepted (it is a subject token)")
	}
	if _, err := cluster.Open(t.Context(), js, cluster.Config{Node: "no spaces"}); err == nil {
		t.Fatal("Open accepted an invalid node name")
	}
}
