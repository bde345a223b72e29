package cluster_test

import (
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/nats-io/nats.go/jetstream"
)

// TestDesiredAvoidsAMemberThatRefusesTheShard: a node whose copy of a shard
// is damaged says so in its member record; placement then gives that shard,
// and only that one, to another member, even one the shard is pinned to,
// and to nobody when no other member is left.
func TestDesiredAvoidsAMemberThatRefusesTheShard(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, js, "a")
	members := []cluster.Member{{Node: "a"}, {Node: "b"}, {Node: "c"}}
	const shards = 32
	before := make([]string, shards)
	for n := range shards {
		before[n] = s.Desired("default", n, members)
	}
	const bad = 5
	owner := before[bad]
	refusing := make([]cluster.Member, len(members))
	copy(refusing, members)
	for i := range refusing {
		if refusing[i].Node == owner {
			refusing[i].Refuses = []string{cluster.ShardName("default", bad), cluster.ShardName("other", 7)}
		}
	}
	for n := range shards {
		got := s.Desired("default", n, refusing)
		switch {
		case n == bad && (got == owner || got == ""):
			t.Fatalf("shard %d desired on %q, whose copy is damaged; want another member", n, got)
		case n != bad && got != before[n]:
			t.Fatalf("shard %d moved from %q to %q: only the refused shard may move", n, before[n], got)
		}
	}

	// A pin to the refusing node gives way too.
	if err := s.SetPin(t.Context(), "default", bad, owner); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for s.Pin("default", bad) != owner {
		if time.Now().After(deadline) {
			t.Fatal("the pin never reached the store's view")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := s.Desired("default", bad, members); got != owner {
		t.Fatalf("pinned shard desired on %q, want the pin %q", got, owner)
	}
	if got := s.Desired("default", bad, refusing); got == owner || got == "" {
		t.Fatalf("pinned shard desired on %q, which refuses it; want another member", got)
	}

	// Alone, the refusing node is no candidate: nobody is asked to serve it.
	alone := []cluster.Member{{Node: owner, Refuses: []string{cluster.ShardName("default", bad)}}}
	if got := s.Desired("default", bad, alone); got != "" {
		t.Fatalf("desired on %q with only the refusing member left, want none", got)
	}
	if got := s.Desired("default", bad+1, alone); got != owner {
		t.Fatalf("another shard desired on %q, want %q (it refuses one shard, not all)", got, owner)
	}
}
