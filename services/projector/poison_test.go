package projector_test

import (
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
)

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
