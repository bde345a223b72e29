package cluster_test

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/cluster"
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

// TestLeasesRememberTheLastEpochThatServed: a take that never serves
// (failed, killed) does not hide which epoch last wrote the shard: each new
// lease carries it (Wrote), and serving moves it to the lease's own epoch.
func TestLeasesRememberTheLastEpochThatServed(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	a, b := open(t, js, "a"), open(t, js, "b")
	l1, err := a.Acquire(t.Context(), "default", 0, nil, 1)
	if err != nil || l1.LastServed() != 0 {
		t.Fatalf("first lease: %+v %v (want nothing served yet)", l1, err)
	}
	l1, err = a.Serve(t.Context(), l1)
	if err != nil || l1.Wrote != 1 || l1.LastServed() != 1 {
		t.Fatalf("served: %+v %v (want wrote 1)", l1, err)
	}
	// Epoch 2 is taken and never serves; it is released (a failed take).
	l2, err := b.Acquire(t.Context(), "default", 0, &l1, 1)
	if err != nil || l2.Epoch != 2 || l2.Wrote != 1 {
		t.Fatalf("take at 2: %+v %v (want wrote 1 carried)", l2, err)
	}
	l2, err = b.Release(t.Context(), l2, "")
	if err != nil || l2.Serving || l2.LastServed() != 1 {
		t.Fatalf("release of 2: %+v %v (want last served still 1)", l2, err)
	}
	// Epoch 3 is taken and its holder dies before serving.
	l3, err := a.Acquire(t.Context(), "default", 0, &l2, 1)
	if err != nil || l3.Epoch != 3 || l3.LastServed() != 1 {
		t.Fatalf("take at 3: %+v %v (want last served 1 through two takes that never served)", l3, err)
	}
	l4, err := b.Acquire(t.Context(), "default", 0, &l3, 1)
	if err != nil || l4.Epoch != 4 || l4.Wrote != 1 {
		t.Fatalf("take at 4: %+v %v", l4, err)
	}
	l4, err = b.Serve(t.Context(), l4)
	if err != nil || l4.LastServed() != 4 {
		t.Fatalf("served at 4: %+v %v (want last served 4)", l4, err)
	}
	// A lease written before Wrote existed: serving says it all, and one
	// that never served says nothing.
	if got := (cluster.Lease{Epoch: 7, Serving: true}).LastServed(); got != 7 {
		t.Fatalf("old serving lease: last served %d, want 7", got)
	}
	if got := (cluster.Lease{Epoch: 7}).LastServed(); got != 0 {
		t.Fatalf("old lease that never served: last served %d, want 0 (unknown)", got)
	}
}

// TestDesiredOnlyAmongMembersServingTheContext: the members bucket is shared
// by every context on one NATS; a shard of context beta is never desired on
// a node that serves only alpha (nobody would ever take it), while a member
// that names no contexts (written before they were named) serves all.
func TestDesiredOnlyAmongMembersServingTheContext(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, js, "a")
	members := []cluster.Member{{Node: "a", Contexts: []string{"alpha"}}, {Node: "b", Contexts: []string{"beta"}}}
	for shard := range 64 {
		if got := s.Desired("beta", shard, members); got != "b" {
			t.Fatalf("beta shard %d desired on %q, want b (the only member serving beta)", shard, got)
		}
		if got := s.Desired("alpha", shard, members); got != "a" {
			t.Fatalf("alpha shard %d desired on %q, want a", shard, got)
		}
	}
	old := []cluster.Member{{Node: "a"}, {Node: "b", Contexts: []string{"beta"}}}
	seen := map[string]bool{}
	for shard := range 64 {
		seen[s.Desired("beta", shard, old)] = true
	}
	if !seen["a"] || !seen["b"] {
		t.Fatalf("beta shards went to %v, want both a (no contexts named: all) and b", seen)
	}
}

// TestNodesAgreeOnShards: the first node to serve a context records its
// shard count; a node with the same count joins, one with another is
// refused with the count to start with, and the record is no lease.
func TestNodesAgreeOnShards(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	a, b := open(t, js, "a"), open(t, js, "b")
	if err := a.AgreeShards(t.Context(), "default", 16); err != nil {
		t.Fatalf("first node: %v", err)
	}
	if err := b.AgreeShards(t.Context(), "default", 16); err != nil {
		t.Fatalf("a node with the same count: %v", err)
	}
	err = b.AgreeShards(t.Context(), "default", 64)
	if err == nil || !strings.Contains(err.Error(), "has 16 shards in this cluster") || !strings.Contains(err.Error(), "--shards 16") {
		t.Fatalf("a node with 64 shards where the cluster has 16: %v", err)
	}
	if err := b.AgreeShards(t.Context(), "other", 64); err != nil {
		t.Fatalf("another context keeps its own count: %v", err)
	}
	// A node that opens the bucket afterwards reads the records without
	// taking them for leases (it would warn of an unreadable one).
	var logs bytes.Buffer
	c, err := cluster.Open(t.Context(), js, cluster.Config{Node: "c", Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if strings.Contains(logs.String(), "unreadable lease") {
		t.Fatalf("the shard counts were read as leases:\n%s", logs.String())
	}
}
