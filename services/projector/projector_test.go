package projector_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
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
