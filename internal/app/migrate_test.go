package app_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go/jetstream"
)

// joinShardnode starts another shardnode in process against first's NATS;
// it stops (handing its shards back) before first does.
func joinShardnode(t *testing.T, first *kumatest.Node, name string) *app.App {
	t.Helper()
	a, err := app.New(app.Config{Target: app.ModuleShardnode, NodeName: name, DataDir: t.TempDir(),
		Shards: first.Cfg.Shards, NATSURL: first.App.ClientURL(), Logger: first.Cfg.Logger})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // a no-op when the test has stopped it
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := a.Stop(ctx); err != nil {
			t.Errorf("stop %s: %v", name, err)
		}
	})
	return a
}

// leaseKV reads the leases bucket directly: what status must agree with.
func leaseKV(t *testing.T, n *kumatest.Node) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(t.Context(), cluster.LeasesBucket)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func readLease(t *testing.T, kv jetstream.KeyValue, shard int) cluster.Lease {
	t.Helper()
	e, err := kv.Get(t.Context(), fmt.Sprintf("lease.%s.%d", kuma.DefaultContext, shard))
	if err != nil {
		t.Fatalf("lease of shard %d: %v", shard, err)
	}
	var l cluster.Lease
	if err := json.Unmarshal(e.Value(), &l); err != nil {
		t.Fatal(err)
	}
	return l
}

// readPin returns the shard's pin as stored ("" when there is none).
func readPin(t *testing.T, kv jetstream.KeyValue, shard int) string {
	t.Helper()
	e, err := kv.Get(t.Context(), fmt.Sprintf("pin.%s.%d", kuma.DefaultContext, shard))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(e.Value())
}

// waitStatus polls status until done holds (or fails after a generous
// deadline: moves wait for the control tick and the minimum hold).
func waitStatus(t *testing.T, c *client.Client, what string, done func(*kuma.StatusReply) bool) *kuma.StatusReply {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var st *kuma.StatusReply
	for {
		var err error
		st, err = c.Status(t.Context())
		if err == nil && done(st) {
			return st
		}
		if time.Now().After(deadline) {
			b, _ := json.MarshalIndent(st, "", "  ")
			t.Fatalf("%s: not reached (last error %v); last status:\n%s", what, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// settled: every shard owned where it should be, nothing moving, and the
// given members live.
func settled(members ...string) func(*kuma.StatusReply) bool {
	return func(st *kuma.StatusReply) bool {
		if len(st.Nodes) != len(members) || len(st.Moves) != 0 {
			return false
		}
		for i, n := range st.Nodes {
			if n.Name != members[i] || n.Error != "" {
				return false
			}
		}
		for _, s := range st.Shards {
			if s.Owner == "" || s.Owner != s.Desired || s.Moving != "" || s.Error != "" {
				return false
			}
		}
		return true
	}
}

func shardLine(t *testing.T, st *kuma.StatusReply, shard int) kuma.ShardStatus {
	t.Helper()
	for _, s := range st.Shards {
		if s.Shard == shard {
			return s
		}
	}
	t.Fatalf("status has no shard %d", shard)
	return kuma.ShardStatus{}
}

// TestStatusOfOneNode: a cluster of one lists itself and every shard,
// owned by it under the epoch its lease holds.
func TestStatusOfOneNode(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.NodeName = "solo" })
	c := n.Client(client.Options{})
	st, err := c.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.AnsweredBy != "solo" || len(st.Nodes) != 1 || st.Nodes[0].Name != "solo" || st.Nodes[0].Shards != 4 ||
		st.Nodes[0].Started.IsZero() || st.Nodes[0].Draining || st.Nodes[0].Error != "" {
		t.Fatalf("nodes %+v answered by %q, want solo alone with 4 shards", st.Nodes, st.AnsweredBy)
	}
	kv := leaseKV(t, n)
	for i, s := range st.Shards {
		l := readLease(t, kv, i)
		if s.Shard != i || s.Owner != "solo" || s.Epoch != l.Epoch || s.Epoch < 1 || s.Desired != "solo" || s.Pinned != "" || s.Moving != "" || s.Error != "" {
			t.Fatalf("shard line %+v, lease %+v", s, l)
		}
	}
	if len(st.Shards) != 4 || st.Moves == nil || len(st.Moves) != 0 {
		t.Fatalf("%d shards, moves %v; want 4 and none", len(st.Shards), st.Moves)
	}
}

// TestClusterStatusAndMigrate: with two shardnodes, status answered by
// either lists both members and every shard with the owner and epoch of
// its lease and the counts its owner reports; a migrate moves a shard (the
// epoch rises, the data stays readable) and back; bad requests change no
// pin.
func TestClusterStatusAndMigrate(t *testing.T) {
	if testing.Short() {
		t.Skip("moves shards between two nodes: seconds")
	}
	first := kumatest.Start(t, func(c *app.Config) { c.NodeName = "n1"; c.Shards = 8 })
	second := joinShardnode(t, first, "n2")
	c := first.Client(client.Options{Timeout: 20 * time.Second})
	kv := leaseKV(t, first)
	waitStatus(t, c, "two nodes settled", settled("n1", "n2"))

	// One event on each of 16 entities; every shard's counts come from its
	// owner, whichever node answers.
	ctx := t.Context()
	for i := range 16 {
		if _, err := c.Append(ctx, fmt.Sprintf("acct-%d", i), []kuma.EventInput{{Type: "Opened", Data: json.RawMessage(`{"n":1}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, a := range []*app.App{first.App, second} {
		st, err := a.Shardnode().Status(ctx, kuma.DefaultContext)
		if err != nil {
			t.Fatal(err)
		}
		me := a.Config().NodeName
		if st.AnsweredBy != me || len(st.Nodes) != 2 || st.Nodes[0].Name != "n1" || st.Nodes[1].Name != "n2" {
			t.Fatalf("status by %s: answered by %q, nodes %+v", me, st.AnsweredBy, st.Nodes)
		}
		owned := map[string]int{}
		var events int64
		for i, s := range st.Shards {
			l := readLease(t, kv, i)
			if s.Shard != i || s.Owner != l.Owner || s.Epoch != l.Epoch || s.Error != "" {
				t.Fatalf("status by %s, shard %d: owner %q epoch %d, lease says %q epoch %d (%+v)", me, i, s.Owner, s.Epoch, l.Owner, l.Epoch, s)
			}
			owned[s.Owner]++
			events += s.Events
			var served int64 = -1
			owner := first.App
			if s.Owner == "n2" {
				owner = second
			}
			for _, x := range owner.Shardnode().Stats() {
				if x.Shard == i {
					served = x.Store.LastSeq
				}
			}
			if s.Events != served {
				t.Fatalf("status by %s, shard %d: %d events, its owner %s has %d", me, i, s.Events, s.Owner, served)
			}
		}
		if len(st.Shards) != 8 || events != 16 {
			t.Fatalf("status by %s: %d shards, %d events; want 8 and 16", me, len(st.Shards), events)
		}
		for _, n := range st.Nodes {
			if n.Shards != owned[n.Name] || n.Error != "" || n.Started.IsZero() {
				t.Fatalf("status by %s: node %+v, leases give it %d shards", me, n, owned[n.Name])
			}
		}
	}

	// A member that does not answer is listed as unavailable; being
	// draining, it gets no shards, and it cannot be migrated to.
	ghost, _ := json.Marshal(cluster.Member{Node: "ghost", Started: time.Now().UTC(), Draining: true})
	js, _ := jetstream.New(first.NC)
	members, err := js.KeyValue(ctx, cluster.MembersBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := members.Put(ctx, "ghost", ghost); err != nil {
		t.Fatal(err)
	}
	st := waitStatus(t, c, "the ghost listed", func(st *kuma.StatusReply) bool { return len(st.Nodes) == 3 })
	if g := st.Nodes[0]; g.Name != "ghost" || g.Error != "unavailable" || !g.Draining || g.Shards != 0 {
		t.Fatalf("ghost listed as %+v, want unavailable and draining", g)
	}
	for _, s := range st.Shards {
		if s.Error != "" || s.Owner == "ghost" {
			t.Fatalf("a silent member spoiled shard %+v", s)
		}
	}

	// Bad requests answer their code and write no pin.
	for _, tc := range []struct {
		body string
		code kuma.Code
	}{
		{`{"shard":8,"to":"n1"}`, kuma.CodeBadRequest},
		{`{"shard":-1,"to":"n1"}`, kuma.CodeBadRequest},
		{`{"shard":1,"to":"n1","force":true}`, kuma.CodeBadRequest},
		{`{"shard":1,"To":"n1"}`, kuma.CodeBadRequest},
		{`{"to":"n1"}`, kuma.CodeBadRequest},
		{`{"shard":1}`, kuma.CodeBadRequest},
		{`{"shard":1,"to":"n1","unpin":true}`, kuma.CodeBadRequest},
		{`{"shard":1,"to":"nobody"}`, kuma.CodeNotFound},
		{`{"shard":1,"to":"ghost"}`, kuma.CodeNotFound},
	} {
		kerr := wantError(t, request(t, first.NC, kuma.MigrateSubject(kuma.DefaultContext), tc.body), tc.code)
		if tc.code == kuma.CodeNotFound {
			if got := fmt.Sprint(kerr.Details["members"]); got != "[n1 n2]" {
				t.Fatalf("%s: details members %s, want [n1 n2]", tc.body, got)
			}
		}
		for i := range 8 {
			if pin := readPin(t, kv, i); pin != "" {
				t.Fatalf("%s left shard %d pinned to %q", tc.body, i, pin)
			}
		}
	}
	if err := members.Delete(ctx, "ghost"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, c, "the ghost gone", settled("n1", "n2"))

	// Migrate a shard of n1's that holds an entity to n2, then back.
	st, err = c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	entity, shard := "", -1
	for i := 0; shard < 0; i++ {
		e := fmt.Sprintf("acct-%d", i)
		if n := placement.ShardOf(e, 8); i < 16 && shardLine(t, st, n).Owner == "n1" {
			entity, shard = e, n
		}
		if i >= 16 {
			t.Fatal("n1 owns no shard with an entity on it")
		}
	}
	epoch := shardLine(t, st, shard).Epoch
	for _, to := range []string{"n2", "n1"} {
		from := shardLine(t, st, shard).Owner
		rep, err := c.Migrate(ctx, shard, to)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Shard != shard || rep.To != to || !rep.Pinned || rep.Owner != from || rep.Epoch != epoch {
			t.Fatalf("migrate to %s answered %+v; want owner %s epoch %d", to, rep, from, epoch)
		}
		if pin := readPin(t, kv, shard); pin != to {
			t.Fatalf("pin of shard %d is %q, want %q", shard, pin, to)
		}
		st = waitStatus(t, c, "shard moved to "+to, func(st *kuma.StatusReply) bool {
			s := shardLine(t, st, shard)
			return s.Owner == to && s.Moving == "" && s.Error == ""
		})
		s := shardLine(t, st, shard)
		if l := readLease(t, kv, shard); s.Epoch <= epoch || s.Epoch != l.Epoch || s.Pinned != to || s.Desired != to || s.Events < 1 {
			t.Fatalf("after the move to %s: %+v (lease %+v), want a higher epoch than %d", to, s, l, epoch)
		}
		epoch = s.Epoch
		r, err := c.Read(ctx, entity)
		if err != nil {
			t.Fatalf("read %s after the move to %s: %v", entity, to, err)
		}
		if r.Version != 1 || string(r.State) != `{"n":1}` {
			t.Fatalf("read %s after the move to %s: version %d state %s", entity, to, r.Version, r.State)
		}
	}
	if _, err := c.Unpin(ctx, shard); err != nil {
		t.Fatal(err)
	}
	if pin := readPin(t, kv, shard); pin != "" {
		t.Fatalf("unpin left %q", pin)
	}
	waitStatus(t, c, "unpinned", func(st *kuma.StatusReply) bool { return shardLine(t, st, shard).Pinned == "" })
	waitStatus(t, c, "settled after the unpin", settled("n1", "n2"))

	// Once n2 has stopped (handing its shards back), n1 alone owns them all.
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := second.Stop(sctx); err != nil {
		t.Fatal(err)
	}
	st = waitStatus(t, c, "n1 alone", settled("n1"))
	if st.Nodes[0].Shards != 8 {
		t.Fatalf("n1 owns %d shards after n2 left, want 8", st.Nodes[0].Shards)
	}
}
