package main

import (
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

func TestRebuildProgressOverReplicas(t *testing.T) {
	started := true
	reply := &kuma.RebuildReply{Projection: "p", Generation: 3, Started: true, ReplicaFanout: kuma.ReplicaFanout{
		Replicas: []kuma.ReplicaResult{
			{Node: "a", Applied: true, Generation: 3, Started: &started},
			{Node: "b", Applied: true, Generation: 5, Started: &started},
			{Node: "c", Error: &kuma.Error{Code: kuma.CodeInternal, Message: "disk"}},
		}}}
	live := func(node string, gen int64) kuma.ProjectionStatus {
		return kuma.ProjectionStatus{Node: node, State: "running", Generation: gen}
	}
	building := func(node string, gen int64, progress float64, state string) kuma.ProjectionStatus {
		p := live(node, gen-1)
		p.Rebuild = &kuma.RebuildStatus{Generation: gen, Progress: progress, State: state}
		return p
	}
	for _, tc := range []struct {
		name     string
		replicas []kuma.ProjectionStatus
		done     bool
		stopped  bool
		least    float64
		on       string
	}{
		{"both building", []kuma.ProjectionStatus{building("a", 3, 0.7, "running"), building("b", 5, 0.2, "running"), live("c", 1)},
			false, false, 0.2, " on b"},
		{"one done", []kuma.ProjectionStatus{live("a", 3), building("b", 5, 0.9, "running"), live("c", 1)},
			false, false, 0.9, " on b"},
		{"one stopped", []kuma.ProjectionStatus{building("a", 3, 0.5, "stopped"), building("b", 5, 0.9, "running")},
			false, true, 0, " on a"},
		// c refused: its old generation does not hold the rebuild up.
		{"all that started are done", []kuma.ProjectionStatus{live("a", 3), live("b", 5), live("c", 1)},
			true, false, 0, " on 2 replicas"},
		// b went away after starting: waiting for it would never end.
		{"one gone", []kuma.ProjectionStatus{live("a", 3), {Node: "b", State: "unavailable"}},
			true, false, 0, " on 2 replicas"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			top := tc.replicas[0]
			top.Replicas = tc.replicas
			got := rebuildProgress(&top, reply)
			if got.done != tc.done || (got.stopped != nil) != tc.stopped || got.on != tc.on {
				t.Fatalf("got done %v, stopped %v, on %q; want %v, %v, %q", got.done, got.stopped != nil, got.on, tc.done, tc.stopped, tc.on)
			}
			if !tc.done && !tc.stopped && (got.least == nil || got.least.Progress != tc.least) {
				t.Fatalf("least advanced %+v; want progress %v", got.least, tc.least)
			}
		})
	}
	// One projector, no replicas in status: its own fields decide.
	one := building("", 2, 0.5, "running")
	if got := rebuildProgress(&one, &kuma.RebuildReply{Generation: 2}); got.done || got.least == nil || got.on != "" {
		t.Fatalf("single projector rebuilding: %+v; want progress without a node", got)
	}
	done := live("", 2)
	if got := rebuildProgress(&done, &kuma.RebuildReply{Generation: 2}); !got.done {
		t.Fatalf("single projector at generation 2: %+v; want done", got)
	}
}
