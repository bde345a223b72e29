package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestLoadtestSmall runs the tool end to end on a small workload and checks
// that what it reports adds up.
func TestLoadtestSmall(t *testing.T) {
	var out bytes.Buffer
	r, err := run(t.Context(), config{events: 20_000, writers: 20, batch: 100, entities: 50, shards: 4, conns: 2, sync: "FULL", ctxName: "default", timeout: 30e9}, &out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if r.Events != 20_000 || r.Appends != 200 || r.Errors != 0 {
		t.Fatalf("result %+v, want 20,000 events in 200 appends", r)
	}
	if r.P50 <= 0 || r.P50 > r.P99 || r.P99 > r.Max || r.EventsSec <= 0 {
		t.Fatalf("percentiles out of order: %+v", r)
	}
	if !strings.Contains(out.String(), "throughput:") || !strings.Contains(out.String(), "event stream caught up") {
		t.Fatalf("output lacks the throughput line:\n%s", out.String())
	}
	t.Log(out.String())
}
