package projector_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go/jetstream"
)

// counting is a declared projection that counts events and sums amounts per
// entity: any double or missing apply shows in its totals.
func counting(name string) projection.Spec {
	return projection.Spec{
		Name:   name,
		Tables: []string{`CREATE TABLE totals (entity TEXT PRIMARY KEY, events INTEGER NOT NULL, amount INTEGER NOT NULL, last_version INTEGER NOT NULL)`},
		On: map[string]string{
			"Deposited": `INSERT INTO totals (entity, events, amount, last_version) VALUES (:entity, 1, :amount, :version)
				ON CONFLICT (entity) DO UPDATE SET events = events + 1, amount = amount + excluded.amount, last_version = excluded.last_version`,
			// A negative amount breaks the CHECK of poison below.
			"*": `INSERT INTO totals (entity, events, amount, last_version) VALUES (:entity, 1, 0, :version)
				ON CONFLICT (entity) DO UPDATE SET events = events + 1, last_version = excluded.last_version`,
		},
		Forget: `DELETE FROM totals WHERE entity = :entity`,
		Queries: map[string]projection.Query{
			"all":    {SQL: `SELECT entity, events, amount, last_version FROM totals ORDER BY entity`},
			"one":    {SQL: `SELECT entity, events, amount FROM totals WHERE entity = :entity`},
			"totals": {SQL: `SELECT count(*) AS entities, coalesce(sum(events), 0) AS events, coalesce(sum(amount), 0) AS amount FROM totals`},
		},
	}
}

func start(t *testing.T, specs ...projection.Spec) (*kumatest.Node, *client.Client) {
	t.Helper()
	n := kumatest.Start(t, func(c *app.Config) { c.Projections = specs })
	c, err := client.New(n.NC, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return n, c
}

func deposit(t *testing.T, c *client.Client, entity string, amount int) *kuma.AppendReply {
	t.Helper()
	r, err := c.Append(context.Background(), entity, []kuma.EventInput{{Type: "Deposited", Data: json.RawMessage(fmt.Sprintf(`{"amount":%d}`, amount))}})
	if err != nil {
		t.Fatalf("append %s: %v", entity, err)
	}
	return r
}

// TestReadYourWrites: an append's position given as after makes the very
// first query see the write, every time.
func TestReadYourWrites(t *testing.T) {
	_, c := start(t, counting("counts"))
	ctx := t.Context()
	for i := range 200 {
		e := fmt.Sprintf("ryw-%02d", i%17)
		r := deposit(t, c, e, i)
		q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: r.Position, Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"` + e + `"`)}})
		if err != nil {
			t.Fatalf("iteration %d: query entities: %v", i, err)
		}
		if len(q.Rows) != 1 || q.Rows[0]["version"] != float64(r.LastVersion) {
			t.Fatalf("iteration %d: entities rows %v; want %s at version %d", i, q.Rows, e, r.LastVersion)
		}
		q, err = c.Query(ctx, "counts", &kuma.QueryRequest{Query: "one", After: r.Position, Params: map[string]json.RawMessage{"entity": json.RawMessage(`"` + e + `"`)}})
		if err != nil {
			t.Fatalf("iteration %d: query counts: %v", i, err)
		}
		if len(q.Rows) != 1 || q.Rows[0]["events"] != float64(r.LastVersion) {
			t.Fatalf("iteration %d: counts rows %v; want %d events", i, q.Rows, r.LastVersion)
		}
	}
}

// TestEntitiesQuery covers where, prefix, paging and the query errors.
func TestEntitiesQuery(t *testing.T) {
	n, c := start(t)
	ctx := t.Context()
	for i := range 25 {
		role := "engineer"
		if i%5 == 0 {
			role = "architect"
		}
		_, err := c.Append(ctx, fmt.Sprintf("user_%02d", i), []kuma.EventInput{{Type: "Joined", Data: json.RawMessage(fmt.Sprintf(`{"role":%q,"level":%d,"active":%v}`, role, i%3, i%2 == 0))}})
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Append(ctx, "team_a", []kuma.EventInput{{Type: "Formed", Data: json.RawMessage(`{"role":"architect"}`)}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "all 26 entities are projected", func() bool {
		q, err := c.Query(ctx, "entities", &kuma.QueryRequest{})
		return err == nil && len(q.Rows) == 26
	})
	q, err := c.Query(ctx, "entities", &kuma.QueryRequest{Params: map[string]json.RawMessage{"where": json.RawMessage(`{"role":"architect"}`)}})
	if err != nil {
		t.Fatal(err)
	}
	var all []string
	for _, r := range q.Rows {
		all = append(all, r["entity"].(string))
	}
	if want := []string{"team_a", "user_00", "user_05", "user_10", "user_15", "user_20"}; !slices.Equal(all, want) {
		t.Fatalf("where role=architect: %v; want %v", all, want)
	}
	q, err = c.Query(ctx, "entities", &kuma.QueryRequest{Params: map[string]json.RawMessage{
		"where": json.RawMessage(`{"role":"architect","active":true}`), "prefix": json.RawMessage(`"user_"`)}})
	if err != nil || len(q.Rows) != 3 { // user_00, user_10, user_20
		t.Fatalf("where role and active, prefix user_: %v, %v; want 3 rows", q, err)
	}
	if st := q.Rows[0]["state"].(map[string]any); st["role"] != "architect" || q.Rows[0]["updated_at"] == "" {
		t.Fatalf("row %v lacks its state", q.Rows[0])
	}
	// Pages of 10 over the 25 users, in id order, with no repeats.
	var seen []string
	cursor := ""
	for page := 0; ; page++ {
		q, err := c.Query(ctx, "entities", &kuma.QueryRequest{Limit: 10, Cursor: cursor, Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"user_"`)}})
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range q.Rows {
			seen = append(seen, r["entity"].(string))
		}
		if q.NextCursor == "" {
			break
		}
		cursor = q.NextCursor
		if page > 5 {
			t.Fatal("paging does not end")
		}
	}
	if len(seen) != 25 || !slices.IsSorted(seen) {
		t.Fatalf("paged %d users (sorted %v); want 25 in order", len(seen), slices.IsSorted(seen))
	}
	// Numbers match by value and type: level 1 is not "1".
	q, _ = c.Query(ctx, "entities", &kuma.QueryRequest{Params: map[string]json.RawMessage{"where": json.RawMessage(`{"level":1}`)}})
	q2, _ := c.Query(ctx, "entities", &kuma.QueryRequest{Params: map[string]json.RawMessage{"where": json.RawMessage(`{"level":"1"}`)}})
	if len(q.Rows) == 0 || len(q2.Rows) != 0 {
		t.Fatalf("level 1 matched %d rows, \"1\" %d; want some and none", len(q.Rows), len(q2.Rows))
	}

	bad := []struct {
		name string
		proj string
		req  kuma.QueryRequest
		code kuma.Code
	}{
		{"unknown projection", "nope", kuma.QueryRequest{}, kuma.CodeNotFound},
		{"named query on entities", "entities", kuma.QueryRequest{Query: "x"}, kuma.CodeNotFound},
		{"unknown param", "entities", kuma.QueryRequest{Params: map[string]json.RawMessage{"sql": json.RawMessage(`"DROP"`)}}, kuma.CodeBadRequest},
		{"object in where", "entities", kuma.QueryRequest{Params: map[string]json.RawMessage{"where": json.RawMessage(`{"a":{"b":1}}`)}}, kuma.CodeBadRequest},
		{"limit too big", "entities", kuma.QueryRequest{Limit: 1001}, kuma.CodeBadRequest},
		{"bad cursor", "entities", kuma.QueryRequest{Cursor: "!!"}, kuma.CodeBadRequest},
		{"bad after", "entities", kuma.QueryRequest{After: "p2.x"}, kuma.CodeBadRequest},
		{"wait too long", "entities", kuma.QueryRequest{After: "p1.0.1", WaitMS: func() *int { n := 10001; return &n }()}, kuma.CodeBadRequest},
		{"position never reached", "entities", kuma.QueryRequest{After: "p1.0.999999", WaitMS: func() *int { n := 50; return &n }()}, kuma.CodeTimeout},
	}
	for _, b := range bad {
		_, err := c.Query(ctx, b.proj, &b.req)
		if kuma.ErrorCode(err) != b.code {
			t.Errorf("%s: error %v; want %s", b.name, err, b.code)
		}
	}
	// Over plain NATS, a wrongly cased field is refused too.
	msg, err := n.NC.Request(kuma.QuerySubject(kuma.DefaultContext, "entities"), []byte(`{"Limit":5}`), 5*time.Second)
	if err != nil || msg.Header.Get("Nats-Service-Error-Code") != "400" {
		t.Fatalf("{\"Limit\":5}: %v %v; want a 400", msg, err)
	}
}

// TestForgetReachesProjections: the entities row goes and the declared
// forget statement runs.
func TestForgetReachesProjections(t *testing.T) {
	_, c := start(t, counting("counts"))
	ctx := t.Context()
	r := deposit(t, c, "gone-1", 5)
	keep := deposit(t, c, "kept-1", 7)
	for _, p := range []string{r.Position, keep.Position} {
		if _, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "all", After: p}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Forget(ctx, "gone-1", "test", ""); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		e, _ := c.Query(ctx, "entities", &kuma.QueryRequest{Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"gone-"`)}})
		n, _ := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "one", Params: map[string]json.RawMessage{"entity": json.RawMessage(`"gone-1"`)}})
		if e != nil && n != nil && len(e.Rows) == 0 && len(n.Rows) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after forget: entities %v, counts %v; want both empty", e, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	k, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "one", Params: map[string]json.RawMessage{"entity": json.RawMessage(`"kept-1"`)}})
	if err != nil || len(k.Rows) != 1 {
		t.Fatalf("the other entity: %v, %v; want its row", k, err)
	}
}

// poison is a projection whose CHECK refuses a negative amount.
func poison() projection.Spec {
	return projection.Spec{
		Name:   "strict",
		Tables: []string{`CREATE TABLE seen (entity TEXT NOT NULL, version INTEGER NOT NULL, amount INTEGER NOT NULL CHECK (amount >= 0), PRIMARY KEY (entity, version))`},
		On:     map[string]string{"Deposited": `INSERT INTO seen (entity, version, amount) VALUES (:entity, :version, :amount)`},
		// A forget statement that fails, for the skip of a forget.
		Forget: `INSERT INTO seen (entity, version, amount) VALUES (:entity, -1, -1)`,
		Queries: map[string]projection.Query{
			"count": {SQL: `SELECT count(*) AS n FROM seen`},
		},
	}
}

func projectionStatus(t *testing.T, c *client.Client, name string) kuma.ProjectionStatus {
	t.Helper()
	st, err := c.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Projections {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("status has no projection %q: %+v", name, st.Projections)
	return kuma.ProjectionStatus{}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPoisonEventStopsVisiblyRetryAndSkip: a failing statement stops its
// projection at that event (status shows it, later events wait), retry tries
// it again, skip records it and moves on; other projections keep going.
func TestPoisonEventStopsVisiblyRetryAndSkip(t *testing.T) {
	_, c := start(t, poison())
	ctx := t.Context()
	deposit(t, c, "acct-1", 5)
	bad := deposit(t, c, "acct-1", -1)
	after := deposit(t, c, "acct-1", 3)

	var st kuma.ProjectionStatus
	eventually(t, "the projection stops at the bad event", func() bool {
		st = projectionStatus(t, c, "strict")
		return st.State == "stopped"
	})
	if st.Error == nil || st.Error.Position != bad.Position || st.Error.EventType != "Deposited" || st.Error.Entity != "acct-1" {
		t.Fatalf("stopped with %+v; want the error at %s", st.Error, bad.Position)
	}
	// Nothing after it was applied, and a read-your-writes query times out
	// rather than answering without the write.
	if _, err := c.Query(ctx, "strict", &kuma.QueryRequest{Query: "count", After: after.Position, WaitMS: func() *int { n := 100; return &n }()}); kuma.ErrorCode(err) != kuma.CodeTimeout {
		t.Fatalf("query after the stopped event: %v; want timeout", err)
	}
	// The built-in projection is not held up.
	if _, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: after.Position}); err != nil {
		t.Fatalf("entities: %v", err)
	}
	// Retry: tried again, fails again, still stopped at the same event.
	since := st.Error.Since
	if err := c.RetryProjection(ctx, "strict"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the retry is attempted", func() bool {
		st = projectionStatus(t, c, "strict")
		return st.State == "stopped" && st.Error.Since.After(since)
	})
	if st.Error.Position != bad.Position {
		t.Fatalf("after retry stopped at %s; want %s", st.Error.Position, bad.Position)
	}
	// Skip must name the event it stopped at.
	if err := c.SkipProjection(ctx, "strict", after.Position); kuma.ErrorCode(err) != kuma.CodeBadRequest {
		t.Fatalf("skip of another position: %v; want bad_request", err)
	}
	if err := c.SkipProjection(ctx, "strict", bad.Position); err != nil {
		t.Fatal(err)
	}
	q, err := c.Query(ctx, "strict", &kuma.QueryRequest{Query: "count", After: after.Position, WaitMS: func() *int { n := 10000; return &n }()})
	if err != nil || q.Rows[0]["n"] != float64(2) {
		t.Fatalf("after skip: %v, %v; want the 2 good events", q, err)
	}
	st = projectionStatus(t, c, "strict")
	if st.State != "running" || st.Skipped != 1 || st.Error != nil {
		t.Fatalf("after skip: %+v; want running with 1 skipped", st)
	}
	if err := c.RetryProjection(ctx, "strict"); kuma.ErrorCode(err) != kuma.CodeBadRequest {
		t.Fatalf("retry of a running projection: %v; want bad_request", err)
	}

	// A forget whose statement fails stops the projection at "forget",
	// and can be skipped too.
	if _, err := c.Forget(ctx, "acct-1", "test", ""); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the projection stops at the forget", func() bool {
		st = projectionStatus(t, c, "strict")
		return st.State == "stopped"
	})
	if st.Error.Position != "forget" {
		t.Fatalf("stopped at %q; want forget", st.Error.Position)
	}
	if err := c.SkipProjection(ctx, "strict", "forget"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the forget is skipped", func() bool {
		st = projectionStatus(t, c, "strict")
		return st.State == "running" && st.Skipped == 2
	})
}

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
