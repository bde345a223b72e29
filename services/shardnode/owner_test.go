package shardnode

import (
	"errors"
	"reflect"
	"sort"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

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

// TestMovesListsTheShardsUnderWay: status shows each move under way with
// this node's name and what the move is; a node not in a cluster (no
// owner) moves nothing.
func TestMovesListsTheShardsUnderWay(t *testing.T) {
	if got := (&Service{}).Moves(); got != nil {
		t.Fatalf("moves of a node with no owner: got %v, want none", got)
	}
	o := &owner{cfg: ClusterConfig{MaxMoves: 4}, moving: map[shardKey]string{}}
	s := &Service{cfg: Config{NodeName: "n1"}, owner: o}
	o.beginMove(shardKey{"default", 3}, "handing off to n2", false)
	o.beginMove(shardKey{"payments", 0}, "failing over from n3", false)
	got := s.Moves()
	sort.Slice(got, func(i, j int) bool { return got[i].Context < got[j].Context })
	want := []kuma.ShardMove{
		{Node: "n1", Context: "default", Shard: 3, What: "handing off to n2"},
		{Node: "n1", Context: "payments", Shard: 0, What: "failing over from n3"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("moves: got %+v, want %+v", got, want)
	}
	o.endMove(shardKey{"default", 3})
	if got := s.Moves(); len(got) != 1 || got[0].Context != "payments" {
		t.Fatalf("moves after one ended: got %+v, want only payments/0", got)
	}
}

// TestMemberRecordNamesTheServedContexts: the heartbeat's member record
// lists the contexts the node serves, in its config's order, which is what
// placement reads to put a context's shards only on nodes that serve it.
func TestMemberRecordNamesTheServedContexts(t *testing.T) {
	o := &owner{s: &Service{cfg: Config{Contexts: []ContextConfig{{Name: "default", Shards: 4}, {Name: "payments", Shards: 2}}}}}
	if got, want := o.contexts(), []string{"default", "payments"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("contexts: got %v, want %v", got, want)
	}
}

// TestStoppingOnceStopIsClosed: the control loop and a reconcile pass
// give way as soon as Stop closes o.stop, not before.
func TestStoppingOnceStopIsClosed(t *testing.T) {
	o := &owner{stop: make(chan struct{})}
	if o.stopping() {
		t.Fatal("stopping before Stop: got true, want false")
	}
	close(o.stop)
	if !o.stopping() {
		t.Fatal("stopping after Stop: got false, want true")
	}
}

// TestLeaseFencesWritesAtThreeQuartersOfItsTTL: a renewal sent at sent
// allows writes until sent + 3/4 of the TTL, well before another node may
// take the lease (after the whole TTL); past that, a commit is refused as
// unavailable and counted as fenced by the lease. The clock is the owner's
// monotonic one; the margins are hours, so the test does not race it.
func TestLeaseFencesWritesAtThreeQuartersOfItsTTL(t *testing.T) {
	const ttl = time.Hour
	o := &owner{base: time.Now().Add(-2 * time.Hour)} // o.now() is 2h and a little
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	sh := &shard{shardDeps: shardDeps{metrics: m, leaseNow: o.now}, cc: &ContextConfig{Name: "default"}, n: 1}
	lease := cluster.Lease{Owner: "n1", Epoch: 7}

	sent := 2*time.Hour - 10*time.Minute // renewed ten minutes ago
	sh.setLease(lease, sent, ttl)
	if got, want := time.Duration(sh.deadline.Load()), sent+ttl*3/4; got != want {
		t.Fatalf("deadline: got %v, want %v", got, want)
	}
	if got := sh.lease(); got != lease {
		t.Fatalf("lease: got %+v, want %+v", got, lease)
	}
	if err := sh.fence(); err != nil {
		t.Fatalf("fence ten minutes after a renewal of a 1h lease: got %v, want nil", err)
	}

	sh.setLease(lease, time.Hour, ttl) // last renewed 1h ago: past 3/4 of the TTL
	err = sh.fence()
	if !errors.Is(err, kuma.ErrUnavailable) {
		t.Fatalf("fence past 3/4 of the TTL: got %v, want unavailable", err)
	}
	var fenced dto.Metric
	if err := m.fenced.WithLabelValues("lease").Write(&fenced); err != nil {
		t.Fatal(err)
	}
	if got := fenced.GetCounter().GetValue(); got != 1 {
		t.Fatalf("kuma_shard_fenced_total{reason=lease}: got %v, want 1", got)
	}
}

// TestRenewalWaitsForAQuarterOfTheLease: renewDue sends nothing while less
// than a quarter of the TTL has passed since the last renewal (the owner
// here has no lease bucket, so a renewal sent would fail the test). The
// renewal itself needs the bucket and is covered by the cluster tests.
func TestRenewalWaitsForAQuarterOfTheLease(t *testing.T) {
	const ttl = time.Hour
	o := &owner{cfg: ClusterConfig{LeaseTTL: ttl}, base: time.Now().Add(-2 * time.Hour)}
	sh := &shard{}
	sh.setLease(cluster.Lease{Owner: "n1", Epoch: 1}, 2*time.Hour-ttl/8, ttl)
	if err := o.renewDue(t.Context(), sh); err != nil {
		t.Fatalf("renewDue an eighth of the TTL after a renewal: got %v, want nil and nothing sent", err)
	}
}
