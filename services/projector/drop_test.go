package projector_test

import (
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go/jetstream"
)

// TestDropRemovesWhatAnUndeclaredProjectionLeft: a projection removed from
// the declarations is named at the next start and its copies stay until
// `projection drop`, which removes its files, its catalog entry and its
// durable consumers, refuses what must not go, and leaves the other
// projections answering.
func TestDropRemovesWhatAnUndeclaredProjectionLeft(t *testing.T) {
	logs := &kumatest.LogBuffer{}
	n := kumatest.Start(t, func(c *app.Config) {
		c.Projections = append(c.Projections, counting("tally"), counting("keep"))
		c.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	c, err := client.New(n.NC, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var last *kuma.AppendReply
	for i := range 5 {
		last = deposit(t, c, "acct-"+string(rune('a'+i)), 10)
	}
	for _, p := range []string{"tally", "keep"} {
		if _, err := c.Query(t.Context(), p, &kuma.QueryRequest{Query: "totals", After: last.Position}); err != nil {
			t.Fatalf("query %s: %v", p, err)
		}
	}
	dir := filepath.Join(n.Cfg.DataDir, "projector", "default")
	tallyFiles := func() []string {
		m, _ := filepath.Glob(filepath.Join(dir, "tally.*"))
		return m
	}
	if len(tallyFiles()) == 0 {
		t.Fatalf("no read model file of tally in %s", dir)
	}

	// Declared: dropping it would only see it built again.
	if _, err := c.DropProjection(t.Context(), "tally"); kuma.ErrorCode(err) != kuma.CodeBadRequest || !strings.Contains(err.Error(), "declared") {
		t.Fatalf("drop of a declared projection: %v; want bad_request saying it is declared", err)
	}

	// Removed from the declarations: the start names it, status does not
	// list it, and its copies are still there.
	n.Cfg.Projections = []projection.Spec{counting("keep")}
	n.Restart()
	c, err = client.New(n.NC, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "projection no longer declared") || !strings.Contains(logs.String(), "projection=tally") {
		t.Fatalf("the start did not name the projection left behind; log:\n%s", logs.String())
	}
	st, err := c.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Projections {
		if p.Name == "tally" {
			t.Fatalf("status lists the undeclared projection: %+v", p)
		}
	}
	if len(tallyFiles()) == 0 {
		t.Fatal("the read model of tally went with its declaration; it should stay until a drop")
	}
	if got := consumersOf(t, n, "tally"); len(got) == 0 {
		t.Fatal("tally has no durable consumer left on the stream before the drop; the test would prove nothing")
	}

	for _, bad := range []struct{ name, says string }{
		{"entities", "built-in"},
		{"keep", "declared"},
		{"Tally", "not a projection name"},
	} {
		_, err := c.DropProjection(t.Context(), bad.name)
		if kuma.ErrorCode(err) != kuma.CodeBadRequest || !strings.Contains(err.Error(), bad.says) {
			t.Errorf("drop %q: %v; want bad_request saying %q", bad.name, err, bad.says)
		}
	}
	if len(tallyFiles()) == 0 || len(consumersOf(t, n, "tally")) == 0 {
		t.Fatal("a refused drop removed something")
	}

	r, err := c.DropProjection(t.Context(), "tally")
	if err != nil {
		t.Fatalf("drop tally: %v", err)
	}
	if !r.Dropped || len(r.Replicas) != 1 || !r.Replicas[0].Applied {
		t.Fatalf("drop reply %+v; want dropped on the one replica", r)
	}
	removed := r.Replicas[0].Removed
	for _, want := range []string{"file tally.1.db", "catalog entry"} {
		if !slices.Contains(removed, want) {
			t.Errorf("the drop reply does not list %q: %q", want, removed)
		}
	}
	if !slices.ContainsFunc(removed, func(s string) bool { return strings.HasPrefix(s, "consumer ") }) {
		t.Errorf("the drop reply lists no consumer: %q", removed)
	}
	if left := tallyFiles(); len(left) > 0 {
		t.Errorf("files of tally left after the drop: %v", left)
	}
	if left := consumersOf(t, n, "tally"); len(left) > 0 {
		t.Errorf("durable consumers of tally left after the drop: %v", left)
	}
	b, _ := json.Marshal(r)
	t.Logf("drop reply: %s", b)

	// Nothing left: a second drop finds nothing; the other projection
	// still answers; the next start names no orphan.
	if _, err := c.DropProjection(t.Context(), "tally"); kuma.ErrorCode(err) != kuma.CodeNotFound {
		t.Fatalf("second drop: %v; want not_found", err)
	}
	q, err := c.Query(t.Context(), "keep", &kuma.QueryRequest{Query: "totals"})
	if err != nil || len(q.Rows) != 1 {
		t.Fatalf("keep after the drop: %v %v", q, err)
	}
	before := strings.Count(logs.String(), "projection no longer declared")
	n.Restart()
	if after := strings.Count(logs.String(), "projection no longer declared"); after != before {
		t.Fatalf("the start after the drop still names an orphan; log:\n%s", logs.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "keep.1.db")); err != nil {
		t.Fatalf("keep's read model: %v", err)
	}
}

// consumersOf lists the durable consumers of a projection on the context's
// stream (by their metadata).
func consumersOf(t *testing.T, n *kumatest.Node, projection string) []string {
	t.Helper()
	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(t.Context(), kuma.StreamName("default"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	list := st.ListConsumers(t.Context())
	for ci := range list.Info() {
		if ci.Config.Metadata["kuma_projection"] == projection {
			out = append(out, ci.Name)
		}
	}
	if err := list.Err(); err != nil && !errors.Is(err, jetstream.ErrEndOfData) {
		t.Fatal(err)
	}
	return out
}
