package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestLogDurationsReadAsDurations: a duration logs as "8ms", not as the
// nanoseconds slog's JSON handler writes by default (8000000), in both
// formats and inside groups.
func TestLogDurationsReadAsDurations(t *testing.T) {
	var b bytes.Buffer
	log, err := newLogger(&b, "info", "json")
	if err != nil {
		t.Fatal(err)
	}
	log.Info("shard taken", "took", 8*time.Millisecond, "shard", 3)
	log.WithGroup("commit").Info("slow", "fsync", 1500*time.Microsecond)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("logged %q", b.String())
	}
	var first struct {
		Took  any `json:"took"`
		Shard any `json:"shard"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil || first.Took != "8ms" || first.Shard != float64(3) {
		t.Fatalf("took logged as %#v (shard %#v): %s", first.Took, first.Shard, lines[0])
	}
	var second struct {
		Commit struct {
			Fsync any `json:"fsync"`
		} `json:"commit"`
	}
	if err := json.Unmarshal([]byte(lines[1]), &second); err != nil || second.Commit.Fsync != "1.5ms" {
		t.Fatalf("a duration in a group logged as %#v: %s", second.Commit.Fsync, lines[1])
	}

	b.Reset()
	if log, err = newLogger(&b, "info", "text"); err != nil {
		t.Fatal(err)
	}
	log.Info("shard taken", "took", 8*time.Millisecond)
	if !strings.Contains(b.String(), "took=8ms") {
		t.Fatalf("text log: %s", b.String())
	}
}
