package shardnode

import "testing"

// TestMovesAreBoundedPerShardAndPerNode: a shard has one move at a time,
// and the control loop starts at most MaxMoves at once, so that a join is
// a trickle of moves, not a storm; start-up and shutdown (force) are not
// bounded, but still one move per shard.
func TestMovesAreBoundedPerShardAndPerNode(t *testing.T) {
	o := &owner{cfg: ClusterConfig{MaxMoves: 2}, moving: map[shardKey]string{}}
	a, b, c := shardKey{"default", 0}, shardKey{"default", 1}, shardKey{"default", 2}
	steps := []struct {
		name  string
		do    func() bool
		want  bool
		after int // moves under way
	}{
		{"first move", func() bool { return o.beginMove(a, "taking over", false) }, true, 1},
		{"a second move of the same shard", func() bool { return o.beginMove(a, "uploading a snapshot", false) }, false, 1},
		{"a forced second move of the same shard", func() bool { return o.beginMove(a, "handing off to b", true) }, false, 1},
		{"another shard", func() bool { return o.beginMove(b, "taking over", false) }, true, 2},
		{"a third shard past MaxMoves", func() bool { return o.beginMove(c, "taking over", false) }, false, 2},
		{"a third shard, forced", func() bool { return o.beginMove(c, "handing off to b", true) }, true, 3},
		{"the first move ends", func() bool { o.endMove(a); return true }, true, 2},
		{"the first shard again, still past MaxMoves", func() bool { return o.beginMove(a, "taking over", false) }, false, 2},
		{"two more end", func() bool { o.endMove(b); o.endMove(c); return true }, true, 0},
		{"the first shard again", func() bool { return o.beginMove(a, "taking over", false) }, true, 1},
	}
	for _, st := range steps {
		if got := st.do(); got != st.want {
			t.Fatalf("%s: got %v, want %v", st.name, got, st.want)
		}
		if got := len(o.moving); got != st.after {
			t.Fatalf("%s: %d moves under way, want %d", st.name, got, st.after)
		}
	}
	if got := o.moving[a]; got != "taking over" {
		t.Fatalf("what the move is: got %q, want %q", got, "taking over")
	}
}
