package sqlite

import (
	"context"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"weak"
)

func TestOutboxServesFromTailAndFile(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "s.db")
	s := openTest(t, path, 1)
	now := time.Now()
	for i := 0; i < 5; i++ {
		if err := s.Commit(ctx, commitOf("a", int64(i*3+1), 3, now)); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(ctx, commitOf("b", int64(i*2+1), 2, now)); err != nil {
			t.Fatal(err)
		}
	}
	check := func(evs []OutboxEvent, from int64, n int) {
		t.Helper()
		if len(evs) != n {
			t.Fatalf("got %d events after %d, want %d", len(evs), from, n)
		}
		for i, e := range evs {
			if e.Seq != from+int64(i)+1 || len(e.Payload) == 0 {
				t.Fatalf("event %d has position %d, want %d", i, e.Seq, from+int64(i)+1)
			}
		}
	}
	evs, err := s.Outbox(ctx, 0, 7)
	if err != nil {
		t.Fatal(err)
	}
	check(evs, 0, 7)
	evs, _ = s.Outbox(ctx, 7, 100)
	check(evs, 7, 18)
	if evs, _ := s.Outbox(ctx, 25, 100); len(evs) != 0 {
		t.Fatalf("caught up, yet %d events", len(evs))
	}

	// A forget removes the entity's events from the tail and the file alike.
	if _, err := s.Purge(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	evs, _ = s.Outbox(ctx, 10, 100)
	for _, e := range evs {
		if e.Entity == "b" {
			t.Fatalf("a purged entity's event at %d is still offered", e.Seq)
		}
	}
	s.Close()

	// After a reopen the tail is empty: the file serves, the same events.
	s = openTest(t, path, 1)
	defer s.Close()
	evs, _ = s.Outbox(ctx, 0, 100)
	if len(evs) != 15 || evs[0].Entity != "a" || evs[14].Seq != 23 {
		t.Fatalf("after reopen: %d events, last %+v", len(evs), evs[len(evs)-1])
	}
}

// TestMarkWholeIsInspected: the whole-history mark is the epoch of the
// writer that set it, survives a reopen under a newer epoch until that one
// marks too, and a file never marked reads 0.
func TestMarkWholeIsInspected(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "s.db")
	for _, step := range []struct {
		what             string
		epoch            int64
		mark             bool
		wantWhole, wantE int64
	}{
		{"never marked", 2, false, 0, 2},
		{"marked at 2", 2, true, 2, 2},
		{"opened at 5, not marked (a take that never got as far as its mark)", 5, false, 2, 5},
		{"marked at 5", 5, true, 5, 5},
	} {
		s, err := Open(ctx, Config{Path: path, Context: "default", Shard: 0, Shards: 1, Epoch: step.epoch})
		if err != nil {
			t.Fatal(err)
		}
		if step.mark {
			if err := s.MarkWhole(ctx); err != nil {
				t.Fatal(err)
			}
		}
		s.Close()
		got, err := Inspect(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		if got.WholeOf != step.wantWhole || got.Epoch != step.wantE {
			t.Fatalf("%s: %+v, want whole_of %d at epoch %d", step.what, got, step.wantWhole, step.wantE)
		}
	}
}

// TestCopiesAreNotMarkedWhole: a copy of a shard file (a failover snapshot,
// a backup) holds the writer's history only up to the moment it was made,
// while the writer goes on writing under the same epoch. Carrying the
// writer's whole_of mark, a copy put in place by a take that then failed
// was trusted whole by the retake, which read nothing from the stream and
// found the stream ahead of the file: the shard was declared corrupt
// (TestKillEachNodeInTurn, 1 run in 7).
func TestCopiesAreNotMarkedWhole(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(ctx, Config{Path: filepath.Join(dir, "s.db"), Context: "default", Shard: 0, Shards: 1, Epoch: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.MarkWhole(ctx); err != nil {
		t.Fatal(err)
	}
	info, err := s.Backup(ctx, filepath.Join(dir, "copy.db"))
	if err != nil {
		t.Fatal(err)
	}
	if info.WholeOf != 0 || info.Epoch != 3 {
		t.Fatalf("a copy of a file marked whole at epoch 3: %+v, want whole_of 0 (epoch 3 kept)", info)
	}
	if got, err := Inspect(ctx, filepath.Join(dir, "copy.db")); err != nil || got.WholeOf != 0 {
		t.Fatalf("the copy inspected again: %+v, %v", got, err)
	}
	// An older copy that still carries the mark loses it.
	if err := CopyInto(ctx, filepath.Join(dir, "s.db"), filepath.Join(dir, "old.db")); err != nil {
		t.Fatal(err)
	}
	if got, _ := Inspect(ctx, filepath.Join(dir, "old.db")); got.WholeOf != 3 {
		t.Fatalf("CopyInto alone keeps the file as it is: whole_of %d, want 3", got.WholeOf)
	}
	if err := UnmarkWhole(ctx, filepath.Join(dir, "old.db")); err != nil {
		t.Fatal(err)
	}
	if got, _ := Inspect(ctx, filepath.Join(dir, "old.db")); got.WholeOf != 0 {
		t.Fatalf("after UnmarkWhole: whole_of %d, want 0", got.WholeOf)
	}
}

// TestPublishedPayloadsAreNotKept: the in-memory tail holds a committed
// event's payload until the relay has published it, and no longer. Before,
// the tail dropped published events by reslicing, and the old front of its
// array kept their payloads alive until the array happened to be replaced:
// after the seed workload the node held about 60 MB of published payloads.
func TestPublishedPayloadsAreNotKept(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, filepath.Join(t.TempDir(), "s.db"), 1)
	defer s.Close()
	now := time.Now()
	const appends, per = 20, 5
	var payloads []weak.Pointer[byte]
	for i := 0; i < appends; i++ {
		c := &Commit{Entity: "a", CreatedAt: now}
		for j := 0; j < per; j++ {
			p := make([]byte, 4096)
			payloads = append(payloads, weak.Make(&p[0]))
			c.Events = append(c.Events, EventRow{Version: int64(i*per + j + 1), Payload: p, Time: now})
		}
		if err := s.Commit(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	alive := func() int {
		runtime.GC()
		runtime.GC()
		n := 0
		for _, w := range payloads {
			if w.Value() != nil {
				n++
			}
		}
		return n
	}
	// Unpublished, the tail keeps them: the relay reads them from memory.
	if n := alive(); n != appends*per {
		t.Fatalf("%d of %d unpublished payloads in memory, want all (the tail holds them for the relay)", n, appends*per)
	}
	// Half published: the first half goes.
	if evs, err := s.Outbox(ctx, appends*per/2, 10); err != nil || len(evs) != 10 {
		t.Fatalf("outbox after %d: %d events, %v", appends*per/2, len(evs), err)
	}
	if n := alive(); n != appends*per/2 {
		t.Fatalf("%d payloads in memory with half of %d published, want %d", n, appends*per, appends*per/2)
	}
	// All published.
	if evs, err := s.Outbox(ctx, appends*per, 10); err != nil || len(evs) != 0 {
		t.Fatalf("outbox after the last: %d events, %v", len(evs), err)
	}
	if n := alive(); n != 0 {
		t.Fatalf("%d published payloads still in memory, want none", n)
	}
}
