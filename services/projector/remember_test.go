package projector

import (
	"maps"
	"testing"
	"time"
)

// TestStatusRemembersAReplicaItsDurablesNoLongerName: a replica whose
// durable lived on its own NATS server is not listed once that server is
// down; status still knows it (as unavailable, with what it had applied)
// for rememberReplicasFor, then forgets it.
func TestStatusRemembersAReplicaItsDurablesNoLongerName(t *testing.T) {
	now := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	s := &Service{cfg: Config{Now: func() time.Time { return now }}, replicasSeen: map[string]seenReplica{}}
	listed := func(nodes map[string]map[string]uint64) map[string]map[string]uint64 {
		rs := &replicaSet{last: 100, nodes: nodes}
		s.rememberReplicas(rs)
		return rs.nodes
	}
	all := map[string]map[string]uint64{"n1": {"entities": 90}, "n2": {"entities": 95}, "n3": {"entities": 80}}
	if got := listed(maps.Clone(all)); !maps.EqualFunc(got, all, maps.Equal) {
		t.Fatalf("with every durable listed: %v, want %v", got, all)
	}

	now = now.Add(time.Minute)
	got := listed(map[string]map[string]uint64{"n1": {"entities": 99}, "n2": {"entities": 98}})
	want := map[string]map[string]uint64{"n1": {"entities": 99}, "n2": {"entities": 98}, "n3": {"entities": 80}}
	if !maps.EqualFunc(got, want, maps.Equal) {
		t.Fatalf("n3's durable unlisted a minute later: %v, want n3 remembered: %v", got, want)
	}

	now = now.Add(rememberReplicasFor + time.Second)
	got = listed(map[string]map[string]uint64{"n1": {"entities": 100}, "n2": {"entities": 100}})
	if _, ok := got["n3"]; ok || len(got) != 2 {
		t.Fatalf("n3 unlisted for longer than %s: %v, want it forgotten", rememberReplicasFor, got)
	}
}
