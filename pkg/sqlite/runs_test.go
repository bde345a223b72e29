package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// payloadOf is the test's sealed payload of entity's event at version v:
// distinct per event, of varying length (lengths cross a uvarint byte).
func payloadOf(entity string, v int64) []byte {
	return []byte(fmt.Sprintf("%s@%d:%s", entity, v, strings.Repeat("x", int(v*37%200))))
}

func runCommit(entity string, from int64, n int, now time.Time) *Commit {
	c := &Commit{Entity: entity, CreatedAt: now}
	for i := range n {
		v := from + int64(i)
		c.Events = append(c.Events, EventRow{Version: v, Payload: payloadOf(entity, v), Time: now})
	}
	return c
}

// checkEvents compares what Events returned with versions from..to of
// entity, whose positions are given by pos(version).
func checkEvents(t *testing.T, got []StoredEvent, entity string, from, to int64, pos func(int64) int64) {
	t.Helper()
	if int64(len(got)) != to-from+1 {
		t.Fatalf("%s: %d events, want versions %d..%d", entity, len(got), from, to)
	}
	for i, e := range got {
		v := from + int64(i)
		if e.Version != v || e.Seq != pos(v) || string(e.Payload) != string(payloadOf(entity, v)) {
			t.Fatalf("%s: event %d is version %d at %d (%q); want version %d at %d", entity, i, e.Version, e.Seq, e.Payload, v, pos(v))
		}
	}
}

// TestAnAppendIsOneRow: an append is stored as one row (a run), and every
// reader sees its events one by one, including from the middle of a run:
// reads of a version range, the outbox and the feed after a position inside
// one, with the idempotency record on the append's last event.
func TestAnAppendIsOneRow(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, filepath.Join(t.TempDir(), "shard-000.db"), 1)
	defer s.Close()
	now := time.Now().UTC().Truncate(time.Microsecond)
	// a: versions 1 (pos 1), 2..6 (pos 2..6); b: 1..3 (pos 7..9); a: 7..9 (pos 10..12).
	commits := []*Commit{runCommit("a", 1, 1, now), runCommit("a", 2, 5, now), runCommit("b", 1, 3, now), runCommit("a", 7, 3, now.Add(time.Second))}
	commits[1].Idempotency = &IdempotencyRecord{Key: "k1", FirstVersion: 2, LastVersion: 6, Time: now}
	for _, c := range commits {
		if err := s.Commit(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	var rows, events int64
	if err := s.rdb.QueryRowContext(ctx, `SELECT COUNT(*), SUM(n) FROM events`).Scan(&rows, &events); err != nil {
		t.Fatal(err)
	}
	if rows != 4 || events != 12 || s.LastSeq() != 12 {
		t.Fatalf("%d rows holding %d events, last position %d; want 4 rows, 12 events, 12", rows, events, s.LastSeq())
	}

	posA := func(v int64) int64 {
		if v <= 6 {
			return v
		}
		return v + 3
	}
	for _, r := range [][2]int64{{1, 9}, {3, 5}, {4, 8}, {6, 7}, {9, 9}, {2, 2}} {
		got, err := s.Events(ctx, "a", r[0], r[1], 0)
		if err != nil {
			t.Fatal(err)
		}
		checkEvents(t, got, "a", r[0], r[1], posA)
	}
	got, err := s.Events(ctx, "a", 3, 100, 4) // a limit inside the next run
	if err != nil {
		t.Fatal(err)
	}
	checkEvents(t, got, "a", 3, 6, posA)
	if got, _ := s.Events(ctx, "a", 10, 20, 0); len(got) != 0 {
		t.Fatalf("versions past the last: %d events", len(got))
	}
	if v, err := s.VersionAt(ctx, "a", now); err != nil || v != 6 {
		t.Fatalf("version of a at the first commits' time: %d, %v; want 6", v, err)
	}

	out, err := s.EventsAfter(ctx, 3, 5) // from inside a's second run
	if err != nil {
		t.Fatal(err)
	}
	var seqs []int64
	for _, e := range out {
		seqs = append(seqs, e.Seq)
		if want := (e.Seq == 6); (e.Idempotency != "") != want || want && (e.Idempotency != IdempotencyDigest("k1") || e.FirstVersion != 2) {
			t.Fatalf("outbox event at %d: idempotency %q first version %d", e.Seq, e.Idempotency, e.FirstVersion)
		}
	}
	if fmt.Sprint(seqs) != "[4 5 6 7 8]" {
		t.Fatalf("outbox after 3, limit 5: positions %v", seqs)
	}
	if out[3].Entity != "b" || out[3].Version != 1 || string(out[3].Payload) != string(payloadOf("b", 1)) {
		t.Fatalf("outbox event at 7: %+v", out[3])
	}
	feed, err := s.FeedAfter(ctx, 8, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(feed) != 3 || feed[0].Seq != 9 || feed[0].Entity != "b" || feed[2].Seq != 11 || feed[2].Version != 8 ||
		string(feed[2].Payload) != string(payloadOf("a", 8)) || feed[2].Time != now.Add(time.Second).UnixNano() {
		t.Fatalf("feed after 8, limit 3: %+v", feed)
	}
}

// TestTruncateInsideARun: a truncation at a position inside an append (one
// published in part) keeps the run's events up to it, and the shard goes
// on from there.
func TestTruncateInsideARun(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, filepath.Join(t.TempDir(), "shard-000.db"), 1)
	defer s.Close()
	now := time.Now().UTC()
	c := runCommit("a", 1, 5, now)
	c.Idempotency = &IdempotencyRecord{Key: "k", FirstVersion: 1, LastVersion: 5, Time: now}
	for _, c := range []*Commit{c, runCommit("b", 1, 2, now)} {
		if err := s.Commit(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	dropped, err := s.TruncateAfter(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	if dropped != 4 || s.LastSeq() != 3 {
		t.Fatalf("dropped %d, last position %d; want 4, 3", dropped, s.LastSeq())
	}
	got, err := s.Events(ctx, "a", 1, 10, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkEvents(t, got, "a", 1, 3, func(v int64) int64 { return v })
	if rec, ok, err := s.Entity(ctx, "a"); err != nil || !ok || rec.Version != 3 {
		t.Fatalf("entity a after the truncation: %+v %v %v; want version 3", rec, ok, err)
	}
	if _, ok, _ := s.Entity(ctx, "b"); ok {
		t.Fatal("entity b, all of whose events were dropped, is still there")
	}
	if r, err := s.Idempotency(ctx, "a", "k"); err != nil || r != nil {
		t.Fatalf("the cut append's idempotency record: %+v, %v; want none", r, err)
	}
	if err := s.Commit(ctx, runCommit("a", 4, 2, now)); err != nil {
		t.Fatal(err)
	}
	got, err = s.Events(ctx, "a", 1, 10, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkEvents(t, got, "a", 1, 5, func(v int64) int64 { return v })
}

// schemaOne is the events table as Kuma wrote it before runs (schema 1).
const schemaOne = `
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE events (pos INTEGER PRIMARY KEY, entity TEXT NOT NULL, version INTEGER NOT NULL, payload BLOB NOT NULL, time INTEGER NOT NULL);
CREATE UNIQUE INDEX events_entity_version ON events (entity, version);
INSERT INTO meta VALUES ('schema', '1'), ('context', 'default'), ('shard', '0'), ('shards', '1');`

// TestSchemaOneFileIsUpgraded: a shard file from before runs (one row per
// event) opens, reads as it did, takes appends as runs, and is marked with
// the new schema, so that an older Kuma refuses it rather than misread
// it; a file from a newer Kuma is refused.
func TestSchemaOneFileIsUpgraded(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "shard-000.db")
	db, err := sql.Open("sqlite", DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(schemaOne); err != nil {
		t.Fatal(err)
	}
	for v := int64(1); v <= 3; v++ {
		if _, err := db.Exec(`INSERT INTO events VALUES (?, 'a', ?, ?, 1)`, v, v, payloadOf("a", v)); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	s := openTest(t, path, 1)
	if s.LastSeq() != 3 {
		t.Fatalf("last position %d, want 3", s.LastSeq())
	}
	if err := s.Commit(ctx, runCommit("a", 4, 4, time.Now().UTC())); err != nil {
		t.Fatal(err)
	}
	got, err := s.Events(ctx, "a", 2, 6, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkEvents(t, got, "a", 2, 6, func(v int64) int64 { return v })
	if v, err := readMetaInt(ctx, s.rdb, "schema"); err != nil || v != schemaVersion {
		t.Fatalf("schema after the upgrade: %d, %v; want %d", v, err, schemaVersion)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	db, err = sql.Open("sqlite", DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE meta SET value = ? WHERE key = 'schema'`, fmt.Sprint(schemaVersion+1)); err != nil {
		t.Fatal(err)
	}
	db.Close()
	_, err = Open(ctx, Config{Path: path, Context: "default", Shard: 0, Shards: 1})
	if err == nil || !strings.Contains(err.Error(), "newer Kuma") {
		t.Fatalf("a file from a newer Kuma opened: %v", err)
	}
}

// TestDamagedRunIsCorrupt: a row whose payload does not hold the events it
// counts reads as a damaged file (ErrCorrupt), not as fewer events.
func TestDamagedRunIsCorrupt(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, filepath.Join(t.TempDir(), "shard-000.db"), 1)
	defer s.Close()
	if err := s.Commit(ctx, runCommit("a", 1, 3, time.Now().UTC())); err != nil {
		t.Fatal(err)
	}
	if _, err := s.wdbExec(ctx, `UPDATE events SET n = 4`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Events(ctx, "a", 1, 3, 0); !IsCorrupt(err) {
		t.Fatalf("read of a run of 3 counted as 4: %v, want corrupt", err)
	}
	if _, err := s.EventsAfter(ctx, 0, 10); !IsCorrupt(err) {
		t.Fatalf("outbox over it: %v, want corrupt", err)
	}
	for _, b := range [][]byte{{0x05, 'a'}, {0xff}, {}} {
		if _, err := SplitRun(b, 2); !IsCorrupt(err) {
			t.Fatalf("unframe %x: %v, want corrupt", b, err)
		}
	}
}

// TestCatchUpWritesRuns: events taken from the stream are stored as runs
// too, one per stretch of consecutive events of one entity committed
// together, ending at an append's idempotency record (which names its last
// event); the outbox reads them back as they came, records included.
func TestCatchUpWritesRuns(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, filepath.Join(t.TempDir(), "shard-000.db"), 1)
	defer s.Close()
	t1, t2 := int64(1_000), int64(2_000)
	ev := func(seq int64, entity string, v, tm int64) ReplicatedEvent {
		return ReplicatedEvent{OutboxEvent: OutboxEvent{Seq: seq, Entity: entity, Version: v, Payload: payloadOf(entity, v), Time: tm}}
	}
	idem := ev(3, "a", 3, t1)
	idem.Idempotency, idem.FirstVersion = "sha256:k", 1
	evs := []ReplicatedEvent{
		ev(1, "a", 1, t1), ev(2, "a", 2, t1), idem, // an append with a key: one run
		ev(4, "a", 4, t1), ev(5, "a", 5, t1), // the next append, same time: a run of its own after the record
		ev(6, "b", 1, t1), ev(7, "b", 2, t2), // another time: two runs
		{OutboxEvent: OutboxEvent{Seq: 8}, Skipped: true}, // a forgotten entity's event
		ev(9, "b", 3, t2),
	}
	if _, err := s.ApplyReplicated(ctx, evs); err != nil {
		t.Fatal(err)
	}
	var runs []string
	rows, err := s.rdb.QueryContext(ctx, `SELECT pos, n FROM events ORDER BY pos`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var pos, n int64
		if err := rows.Scan(&pos, &n); err != nil {
			t.Fatal(err)
		}
		runs = append(runs, fmt.Sprintf("%d-%d", pos-n+1, pos))
	}
	rows.Close()
	if got := strings.Join(runs, " "); got != "1-3 4-5 6-6 7-7 9-9" {
		t.Fatalf("rows hold positions %s; want 1-3 4-5 6-6 7-7 9-9", got)
	}
	out, err := s.EventsAfter(ctx, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 8 || s.LastSeq() != 9 {
		t.Fatalf("%d events read back, last position %d; want 8, 9", len(out), s.LastSeq())
	}
	for i, e := range out {
		want := evs[i]
		if i >= 7 {
			want = evs[i+1]
		}
		if e.Seq != want.Seq || e.Entity != want.Entity || e.Version != want.Version || e.Time != want.Time ||
			string(e.Payload) != string(want.Payload) || e.Idempotency != want.Idempotency || e.FirstVersion != want.FirstVersion {
			t.Fatalf("event %d read back as %+v, applied as %+v", i, e, want.OutboxEvent)
		}
	}
	var pos, first, last int64
	if err := s.rdb.QueryRowContext(ctx, `SELECT pos, first_version, last_version FROM idempotency WHERE entity = 'a'`).Scan(&pos, &first, &last); err != nil || pos != 3 || first != 1 || last != 3 {
		t.Fatalf("the idempotency record: position %d, versions %d..%d, %v; want 3, 1..3", pos, first, last, err)
	}
}
