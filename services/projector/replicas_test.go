package projector_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
)

// replicas starts a node named p1 (every module) and a projector-only
// replica per other name on its NATS server, each with its own data dir,
// as `kuma serve --target projector` on other machines would be.
func replicas(t *testing.T, names []string, specs ...projection.Spec) ([]*kumatest.Node, *client.Client) {
	t.Helper()
	base := kumatest.Start(t, func(c *app.Config) { c.NodeName, c.Projections = names[0], specs })
	nodes := []*kumatest.Node{base}
	for _, n := range names[1:] {
		nodes = append(nodes, kumatest.Start(t, func(c *app.Config) {
			c.Target, c.NATSURL, c.NodeName, c.Projections = app.ModuleProjector, base.App.ClientURL(), n, specs
		}))
	}
	return nodes, base.Client(client.Options{})
}

// replicaNodes is the node of every replica status lists, with its state.
func replicaNodes(p kuma.ProjectionStatus) []string {
	var out []string
	for _, r := range p.Replicas {
		out = append(out, r.Node+":"+r.State)
	}
	return out
}

func resultNodes(f kuma.ReplicaFanout) (applied, failed []string) {
	for _, r := range f.Replicas {
		if r.Applied {
			applied = append(applied, r.Node)
		} else {
			failed = append(failed, r.Node)
		}
	}
	return applied, failed
}

// TestProjectorReplicas: three projector replicas on one server. Each
// answers a query with after consistently; status lists all three with
// their lag; a rebuild reaches all three; with one stopped, queries and
// status answer from the others and both status and admin replies name the
// missing replica.
func TestProjectorReplicas(t *testing.T) {
	names := []string{"p1", "p2", "p3"}
	nodes, c := replicas(t, names, counting("counts"))
	ctx := t.Context()

	// Read-your-writes on every replica, asked directly (the queue group
	// would pick one at random) and through the public subject.
	for i := range 30 {
		e := fmt.Sprintf("acct-%02d", i%7)
		r := deposit(t, c, e, i)
		req := func() *kuma.QueryRequest {
			return &kuma.QueryRequest{Query: "one", After: r.Position, Params: map[string]json.RawMessage{"entity": json.RawMessage(`"` + e + `"`)}}
		}
		for _, n := range nodes {
			q, err := n.App.Projector().Query(ctx, "counts", req())
			if err != nil {
				t.Fatalf("iteration %d: replica %s: %v", i, n.Cfg.NodeName, err)
			}
			// Asked in process, rows hold SQLite's integers, not JSON's floats.
			if len(q.Rows) != 1 || fmt.Sprint(q.Rows[0]["events"]) != fmt.Sprint(r.LastVersion) {
				t.Fatalf("iteration %d: replica %s answered %v; want %d events of %s", i, n.Cfg.NodeName, q.Rows, r.LastVersion, e)
			}
		}
		if q, err := c.Query(ctx, "counts", req()); err != nil || q.Rows[0]["events"] != float64(r.LastVersion) {
			t.Fatalf("iteration %d: public query: %v, %v", i, q, err)
		}
	}

	// Status lists every replica, caught up.
	want := []string{"p1:running", "p2:running", "p3:running"}
	eventually(t, "status lists three caught-up replicas", func() bool {
		for _, name := range []string{"counts", "entities"} {
			p := projectionStatus(t, c, name)
			if !slices.Equal(replicaNodes(p), want) {
				return false
			}
			for _, r := range p.Replicas {
				if r.Lag != 0 || r.Applied == 0 {
					return false
				}
			}
		}
		return true
	})

	// A rebuild reaches every replica, and every replica swaps it in.
	rr, err := c.Rebuild(ctx, "counts")
	if err != nil {
		t.Fatal(err)
	}
	if applied, failed := resultNodes(rr.ReplicaFanout); !slices.Equal(applied, names) || len(failed) > 0 || len(rr.Missing) > 0 {
		t.Fatalf("rebuild reply %+v: applied by %v, failed on %v, missing %v; want applied by %v", rr, applied, failed, rr.Missing, names)
	}
	gens := map[string]int64{}
	for _, r := range rr.Replicas {
		if r.Started == nil || !*r.Started {
			t.Fatalf("rebuild on %s: %+v; want started", r.Node, r)
		}
		gens[r.Node] = r.Generation
	}
	eventually(t, "every replica has swapped its rebuilt copy in", func() bool {
		p := projectionStatus(t, c, "counts")
		done := 0
		for _, r := range p.Replicas {
			if r.Rebuild == nil && r.Generation >= gens[r.Node] && r.Lag == 0 {
				done++
			}
		}
		return done == len(names)
	})
	for _, n := range nodes {
		q, err := n.App.Projector().Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"})
		if err != nil || fmt.Sprint(q.Rows[0]["events"]) != "30" {
			t.Fatalf("replica %s after the rebuild: %v, %v; want 30 events", n.Cfg.NodeName, q, err)
		}
	}

	// One replica stops: queries keep answering from the others, with
	// read-your-writes, and status and admin name the one missing.
	nodes[2].Stop()
	for i := range 20 {
		e := fmt.Sprintf("late-%02d", i)
		r := deposit(t, c, e, 1)
		q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: r.Position, Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"` + e + `"`)}})
		if err != nil || len(q.Rows) != 1 {
			t.Fatalf("query %d with p3 stopped: %v, %v", i, q, err)
		}
	}
	p := projectionStatus(t, c, "entities")
	if got, want := replicaNodes(p), []string{"p1:running", "p2:running", "p3:unavailable"}; !slices.Equal(got, want) {
		t.Fatalf("status with p3 stopped lists %v; want %v", got, want)
	}
	if lost := p.Replicas[2]; lost.Lag < 20 {
		t.Fatalf("the stopped replica's lag is %d; want at least the 20 messages it missed", lost.Lag)
	}
	if p.Node == "p3" {
		t.Fatalf("the projection's own fields come from %s, which did not answer", p.Node)
	}
	rr, err = c.Rebuild(ctx, "entities")
	if err != nil {
		t.Fatal(err)
	}
	if applied, _ := resultNodes(rr.ReplicaFanout); !slices.Equal(applied, names[:2]) || !slices.Equal(rr.Missing, []string{"p3"}) {
		t.Fatalf("rebuild with p3 stopped: applied by %v, missing %v; want p1 p2 and p3 missing", applied, rr.Missing)
	}
}

// TestReplicasSkipEverywhere: an event that fails stops every replica;
// one retry reaches them all, and one skip moves them all on.
func TestReplicasSkipEverywhere(t *testing.T) {
	names := []string{"p1", "p2"}
	_, c := replicas(t, names, poison())
	ctx := t.Context()
	deposit(t, c, "acct-1", 5)
	bad := deposit(t, c, "acct-1", -1)
	after := deposit(t, c, "acct-1", 3)
	stoppedOn := func() []string {
		var out []string
		for _, r := range projectionStatus(t, c, "strict").Replicas {
			if r.State == "stopped" && r.Error != nil && r.Error.Position == bad.Position {
				out = append(out, r.Node)
			}
		}
		return out
	}
	eventually(t, "both replicas stop at the bad event", func() bool { return slices.Equal(stoppedOn(), names) })
	top := projectionStatus(t, c, "strict")
	if top.State != "stopped" {
		t.Fatalf("the projection's own state is %q with both replicas stopped", top.State)
	}
	// A skip of another event is refused by both, so the request fails.
	if _, err := c.SkipProjectionReplicas(ctx, "strict", after.Position); kuma.ErrorCode(err) != kuma.CodeBadRequest {
		t.Fatalf("skip of another position: %v; want bad_request", err)
	}
	ar, err := c.RetryProjectionReplicas(ctx, "strict")
	if err != nil {
		t.Fatal(err)
	}
	if applied, _ := resultNodes(ar.ReplicaFanout); !slices.Equal(applied, names) || !ar.Retrying {
		t.Fatalf("retry reply %+v: applied by %v; want %v", ar, applied, names)
	}
	if ar, err = c.SkipProjectionReplicas(ctx, "strict", bad.Position); err != nil {
		t.Fatal(err)
	}
	if applied, _ := resultNodes(ar.ReplicaFanout); !slices.Equal(applied, names) || ar.Skipped != bad.Position {
		t.Fatalf("skip reply %+v: applied by %v; want %v", ar, applied, names)
	}
	eventually(t, "both replicas skip it and go on", func() bool {
		p := projectionStatus(t, c, "strict")
		n := 0
		for _, r := range p.Replicas {
			if r.State == "running" && r.Skipped == 1 && r.Lag == 0 {
				n++
			}
		}
		return n == 2
	})
	// A second skip finds no replica stopped: refused, as with one.
	if err := c.SkipProjection(ctx, "strict", bad.Position); kuma.ErrorCode(err) != kuma.CodeBadRequest {
		t.Fatalf("second skip: %v; want bad_request", err)
	}
}
