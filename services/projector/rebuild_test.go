package projector_test

import (
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go/jetstream"
)

// TestRebuildUnderLoad: queries never fail while a rebuild runs beside the
// live copy under continuous writes, and the rebuilt read model equals one
// built alongside from the start.
func TestRebuildUnderLoad(t *testing.T) {
	_, c := start(t, counting("counts"), counting("reference"))
	ctx := t.Context()
	for i := range 300 {
		deposit(t, c, fmt.Sprintf("acct-%d", i%40), i)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writes, queries, failures atomic.Int64
	var firstFailure atomic.Value
	wg.Add(2)
	go func() { // writer
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_, err := c.Append(ctx, fmt.Sprintf("acct-%d", i%40), []kuma.EventInput{{Type: "Deposited", Data: json.RawMessage(`{"amount":1}`)}})
			if err == nil {
				writes.Add(1)
			}
		}
	}()
	go func() { // reader
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, p := range []string{"counts", "entities"} {
				req := &kuma.QueryRequest{Query: "totals"}
				if p == "entities" {
					req = &kuma.QueryRequest{Limit: 5}
				}
				if _, err := c.Query(ctx, p, req); err != nil {
					failures.Add(1)
					firstFailure.CompareAndSwap(nil, err.Error())
				}
				queries.Add(1)
			}
		}
	}()
	r, err := c.Rebuild(ctx, "counts")
	if err != nil || !r.Started || r.Generation != 2 {
		t.Fatalf("rebuild: %+v, %v; want generation 2 started", r, err)
	}
	if _, err := c.Rebuild(ctx, "entities"); err != nil {
		t.Fatal(err)
	}
	var a, b kuma.ProjectionStatus
	eventually(t, "both rebuilds swap in", func() bool {
		a, b = projectionStatus(t, c, "counts"), projectionStatus(t, c, "entities")
		return a.Generation == 2 && a.Rebuild == nil && b.Generation == 2 && b.Rebuild == nil
	})
	time.Sleep(100 * time.Millisecond) // some load on the new copies too
	close(stop)
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("%d of %d queries failed during the rebuild, first: %v", failures.Load(), queries.Load(), firstFailure.Load())
	}
	if writes.Load() == 0 || queries.Load() == 0 {
		t.Fatalf("no load ran: %d writes, %d queries", writes.Load(), queries.Load())
	}
	// Both have applied every write, and hold the same rows.
	want := 300 + writes.Load()
	sum := func(q *kuma.QueryReply) (n int64) {
		for _, r := range q.Rows {
			n += int64(r["events"].(float64))
		}
		return n
	}
	var got, ref *kuma.QueryReply
	eventually(t, "both have applied every write", func() bool {
		var err1, err2 error
		got, err1 = c.Query(ctx, "counts", &kuma.QueryRequest{Query: "all", Limit: 1000})
		ref, err2 = c.Query(ctx, "reference", &kuma.QueryRequest{Query: "all", Limit: 1000})
		return err1 == nil && err2 == nil && sum(got) == want && sum(ref) == want
	})
	gotRows, _ := json.Marshal(got.Rows)
	refRows, _ := json.Marshal(ref.Rows)
	if string(gotRows) != string(refRows) {
		t.Fatalf("the rebuilt read model differs from the reference:\n%s\n%s", gotRows, refRows)
	}
	t.Logf("%d writes and %d queries during the rebuild, none failed", writes.Load(), queries.Load())
}

// TestRestartResumesExactly: a projector restarted, and one whose durable
// consumer was deleted meanwhile, neither double-applies nor misses events.
func TestRestartResumesExactly(t *testing.T) {
	n, c := start(t, counting("counts"))
	ctx := t.Context()
	total := 0
	var last *kuma.AppendReply
	for i := range 100 {
		last = deposit(t, c, fmt.Sprintf("acct-%d", i%10), i)
		total += i
	}
	check := func(stage string, want int) {
		t.Helper()
		eventually(t, stage, func() bool {
			q, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"})
			return err == nil && q.Rows[0]["amount"] == float64(want)
		})
		q, _ := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"})
		if q.Rows[0]["events"] == nil {
			t.Fatalf("%s: %v", stage, q.Rows)
		}
	}
	if _, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals", After: last.Position}); err != nil {
		t.Fatal(err)
	}
	check("before restart", total)

	n.Restart()
	c, _ = client.New(n.NC, client.Options{})
	// The last applied position survives the restart.
	if q, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"}); err != nil || q.Position == "" {
		t.Fatalf("after restart: %+v, %v; want the last applied position", q, err)
	}
	for i := range 50 {
		deposit(t, c, fmt.Sprintf("acct-%d", i%10), 1)
	}
	total += 50
	check("after restart", total)

	// Delete the durable consumers behind the projector's back, restart:
	// the read model's own positions decide where it resumes.
	js, _ := jetstream.New(n.NC)
	s, err := js.Stream(ctx, kuma.StreamName(kuma.DefaultContext))
	if err != nil {
		t.Fatal(err)
	}
	names := s.ConsumerNames(ctx)
	var deleted int
	for name := range names.Name() {
		if err := s.DeleteConsumer(ctx, name); err == nil {
			deleted++
		}
	}
	if deleted == 0 {
		t.Fatal("found no durable consumer to delete")
	}
	n.Restart()
	c, _ = client.New(n.NC, client.Options{})
	deposit(t, c, "acct-x", 1000)
	total += 1000
	check("after the durables were recreated", total)

	// And while it runs: the subscription notices and recreates it.
	js, _ = jetstream.New(n.NC)
	if s, err = js.Stream(ctx, kuma.StreamName(kuma.DefaultContext)); err != nil {
		t.Fatal(err)
	}
	deleted = 0
	for name := range s.ConsumerNames(ctx).Name() {
		if err := s.DeleteConsumer(ctx, name); err == nil {
			deleted++
		}
	}
	if deleted == 0 {
		t.Fatal("found no durable consumer to delete")
	}
	deposit(t, c, "acct-y", 10)
	total += 10
	check("after the durables were deleted while running", total)
	q, _ := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"})
	if q.Rows[0]["events"] != float64(152) {
		t.Fatalf("events counted %v; want 152", q.Rows[0]["events"])
	}
}
