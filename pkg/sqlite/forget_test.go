package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A forget deletes rows, it does not take positions back: a reopened file
// must continue after the highest position it ever held, or the corruption
// check sees a stream ahead of the file and new commits reuse positions the
// stream already carries.
func TestPurgeKeepsHighWaterAcrossReopen(t *testing.T) {
	ctx := context.Background()
	now := time.Now().UTC()
	cases := []struct {
		name   string
		commit []string // one 2-event commit per entity, in order
		purge  []string
		want   int64 // LastSeq after reopen
	}{
		{"only entity", []string{"a"}, []string{"a"}, 2},
		{"last entity", []string{"a", "b"}, []string{"b"}, 4},
		{"middle entity", []string{"a", "b", "c"}, []string{"b"}, 6},
		{"every entity", []string{"a", "b", "c"}, []string{"c", "a", "b"}, 6},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "s.db")
			s := openTest(t, path, 1)
			for _, e := range tc.commit {
				if err := s.Commit(ctx, commitOf(e, 1, 2, now)); err != nil {
					t.Fatal(err)
				}
			}
			for _, e := range tc.purge {
				if _, err := s.Purge(ctx, e); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			info, err := Inspect(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			if info.LastSeq != tc.want {
				t.Fatalf("Inspect after purge: LastSeq = %d, want %d", info.LastSeq, tc.want)
			}

			s = openTest(t, path, 1)
			defer s.Close()
			if got := s.LastSeq(); got != tc.want {
				t.Fatalf("after purge and reopen LastSeq = %d, want %d", got, tc.want)
			}
			c := commitOf("new", 1, 1, now)
			if err := s.Commit(ctx, c); err != nil {
				t.Fatal(err)
			}
			if c.FirstSeq != tc.want+1 {
				t.Fatalf("next commit got position %d, want %d (a position the stream already holds was reused)", c.FirstSeq, tc.want+1)
			}
		})
	}
}

// A shard rebuilt from the stream keeps its high-water position where rows
// do not: a replayed forget notice purges like Purge does, and the events of
// entities forgotten since they were published (their key is gone) are
// skipped, leaving no rows but taking their positions. A reopen must not
// hand any of those positions out again.
func TestReplicatedKeepsHighWater(t *testing.T) {
	row := func(seq int64, entity string, v int64) ReplicatedEvent {
		return ReplicatedEvent{OutboxEvent: OutboxEvent{Seq: seq, Entity: entity, Version: v, Payload: []byte(`x`), Time: seq}}
	}
	skipped := func(seq int64, entity string, v int64) ReplicatedEvent {
		e := row(seq, entity, v)
		e.Skipped = true
		return e
	}
	for _, tc := range []struct {
		name string
		evs  []ReplicatedEvent
		want int64
	}{
		{"a replayed forget of the last entity", []ReplicatedEvent{row(1, "a", 1), row(2, "a", 2), {OutboxEvent: OutboxEvent{Entity: "a"}, Forgotten: true}}, 2},
		{"skipped events at the end", []ReplicatedEvent{row(1, "a", 1), skipped(2, "gone", 1), skipped(3, "gone", 2)}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			path := filepath.Join(t.TempDir(), "s.db")
			s := openTest(t, path, 1)
			if _, err := s.ApplyReplicated(ctx, tc.evs); err != nil {
				t.Fatal(err)
			}
			if got := s.LastSeq(); got != tc.want {
				t.Fatalf("LastSeq = %d, want %d", got, tc.want)
			}
			s.Close()
			s = openTest(t, path, 1)
			defer s.Close()
			if got := s.LastSeq(); got != tc.want {
				t.Fatalf("after a reopen LastSeq = %d, want %d", got, tc.want)
			}
		})
	}
}

// TruncateAfter lowers the position on purpose: the high-water a purge
// recorded must not hold it up after a reopen.
func TestTruncateAfterLowersHighWater(t *testing.T) {
	ctx := context.Background()
	now := time.Now().UTC()
	path := filepath.Join(t.TempDir(), "s.db")
	s := openTest(t, path, 1)
	for _, e := range []string{"a", "b", "c"} {
		if err := s.Commit(ctx, commitOf(e, 1, 2, now)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Purge(ctx, "c"); err != nil { // high-water 6
		t.Fatal(err)
	}
	if _, err := s.TruncateAfter(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if got := s.LastSeq(); got != 3 {
		t.Fatalf("after TruncateAfter(3) LastSeq = %d, want 3", got)
	}
	s.Close()
	s = openTest(t, path, 1)
	defer s.Close()
	if got := s.LastSeq(); got != 3 {
		t.Fatalf("after TruncateAfter(3) and reopen LastSeq = %d, want 3", got)
	}
}

// After a purge (which checkpoints), no byte of the shard's files holds the
// forgotten entity's id or its event data: deleted cells and freed pages are
// overwritten (secure_delete), and the WAL that held them is truncated.
func TestPurgeLeavesNoResidueOnDisk(t *testing.T) {
	ctx := context.Background()
	now := time.Now().UTC()
	path := filepath.Join(t.TempDir(), "s.db")
	s := openTest(t, path, 1)
	defer s.Close()
	const victim, secret = "victim-qz7xw", "SECRET-VALUE-5h2k9"
	// Enough data that the victim fills whole pages of its own (which a
	// purge frees) and shares others with its neighbours (where only its
	// cells are deleted), in the table and in both indexes.
	payload := []byte(`{"note":"` + secret + strings.Repeat("x", 600) + `"}`)
	for round := range 20 {
		for _, e := range []string{"before", victim, "after"} {
			c := &Commit{Entity: e, CreatedAt: now, Idempotency: &IdempotencyRecord{Key: e + "-key", FirstVersion: int64(round*10 + 1), LastVersion: int64(round*10 + 10), Time: now}}
			for i := range 10 {
				p := []byte(`{"i":1}`)
				if e == victim {
					p = payload
				}
				c.Events = append(c.Events, EventRow{Version: int64(round*10 + i + 1), Payload: p, Time: now})
			}
			if round > 0 {
				c.Idempotency = nil
			}
			if e == victim && round%5 == 4 {
				c.Snapshot = &Snapshot{Version: int64(round*10 + 10), State: payload, UpdatedAt: now}
			}
			if err := s.Commit(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := s.Purge(ctx, victim); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(path + "*")
	if len(files) == 0 {
		t.Fatal("no shard files")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, needle := range []string{victim, secret} {
			if n := strings.Count(string(b), needle); n > 0 {
				t.Errorf("%s holds %d copies of %q after the purge", filepath.Base(f), n, needle)
			}
		}
	}
	// The neighbours are intact.
	for _, e := range []string{"before", "after"} {
		if rec, ok, err := s.Entity(ctx, e); err != nil || !ok || rec.Version != 200 {
			t.Fatalf("%s after the purge: %+v %v %v", e, rec, ok, err)
		}
	}
}

// BenchmarkPurge forgets entities of 100 events each, among others that stay:
// the cost of overwriting what a forget deletes (secure_delete).
func BenchmarkPurge(b *testing.B) {
	ctx := context.Background()
	now := time.Now().UTC()
	s, err := Open(ctx, Config{Path: filepath.Join(b.TempDir(), "s.db"), Context: "default", Shards: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	data := []byte(`{"name":"Dwighson","role":"architect","email":"dwighson@example.com","team":"platform","level":7,"tags":["a","b","c"],"active":true,"note":"lorem ipsum dolor sit amet"}`)
	for i := range b.N {
		for _, e := range []string{fmt.Sprintf("stay-%d", i), fmt.Sprintf("go-%d", i)} {
			c := &Commit{Entity: e, CreatedAt: now}
			for v := int64(1); v <= 100; v++ {
				c.Events = append(c.Events, EventRow{Version: v, Payload: data, Time: now})
			}
			if err := s.Commit(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ResetTimer()
	for i := range b.N {
		if _, err := s.Purge(ctx, fmt.Sprintf("go-%d", i)); err != nil {
			b.Fatal(err)
		}
	}
}

// A crash between a purge's commit and its checkpoint leaves the deleted
// rows' old pages in the WAL; the next open empties it before anything else.
func TestOpenTruncatesWALAfterCrashedPurge(t *testing.T) {
	ctx := context.Background()
	const victim = "victim-w4l9k"
	path := filepath.Join(t.TempDir(), "s.db")
	s := openTest(t, path, 1)
	if err := s.Commit(ctx, commitOf("neighbour", 1, 3, time.Now())); err != nil {
		t.Fatal(err)
	}
	s.Close()

	// Write and delete the victim's rows as a purge would, with no
	// checkpoint, and copy the files as a crash would leave them.
	raw, err := sql.Open("sqlite", DSN(path, "journal_mode(WAL)", "secure_delete(ON)", "wal_autocheckpoint(0)"))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetMaxOpenConns(1)
	for v := 1; v <= 20; v++ {
		if _, err := raw.ExecContext(ctx, `INSERT INTO events (pos, entity, version, payload, time) VALUES (?, ?, ?, ?, 1)`,
			100+v, victim, v, []byte(strings.Repeat("p", 500))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := raw.ExecContext(ctx, `DELETE FROM events WHERE entity = ?`, victim); err != nil {
		t.Fatal(err)
	}
	crashed := filepath.Join(t.TempDir(), "s.db")
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil {
			t.Fatal(err)
		}
		if suffix == "-wal" && !strings.Contains(string(b), victim) {
			t.Fatal("the WAL does not hold the victim before the reopen: the check below would prove nothing")
		}
		if err := os.WriteFile(crashed+suffix, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	s = openTest(t, crashed, 1)
	defer s.Close()
	for _, f := range []string{crashed, crashed + "-wal"} {
		b, err := os.ReadFile(f)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		if strings.Contains(string(b), victim) {
			t.Errorf("%s holds the purged id after the reopen", filepath.Base(f))
		}
	}
	if rec, ok, err := s.Entity(ctx, "neighbour"); err != nil || !ok || rec.Version != 3 {
		t.Fatalf("neighbour after reopen: %+v %v %v", rec, ok, err)
	}
}
