package sqlite

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/damage"
)

// corruptContent is what a shard file holds, read back through the shard's
// own read methods: the entity rows and every event.
type corruptContent struct {
	Entities map[string]EntityRecord
	Events   map[string][]StoredEvent
}

// corruptBuild writes a closed shard file at path: entities e0..e39 with 25
// events each, in commits of 5, with 300-byte random payloads. Enough for
// dozens of leaf pages in the events table.
func corruptBuild(t testing.TB, path string) {
	t.Helper()
	ctx := context.Background()
	s, err := Open(ctx, Config{Path: path, Context: "default", Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	for round := 0; round < 5; round++ {
		for e := 0; e < 40; e++ {
			c := &Commit{Entity: fmt.Sprintf("e%d", e), CreatedAt: now}
			for i := 0; i < 5; i++ {
				p := make([]byte, 300)
				rand.Read(p)
				c.Events = append(c.Events, EventRow{Version: int64(round*5 + i + 1), Payload: p, Time: now.Add(time.Duration(round) * time.Second)})
			}
			if err := s.Commit(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// corruptRead reads everything the shard holds of e0..e39; the first error
// is returned as is.
func corruptRead(ctx context.Context, s *Shard) (corruptContent, error) {
	out := corruptContent{Entities: map[string]EntityRecord{}, Events: map[string][]StoredEvent{}}
	for e := 0; e < 40; e++ {
		id := fmt.Sprintf("e%d", e)
		rec, ok, err := s.Entity(ctx, id)
		if err != nil {
			return out, err
		}
		if ok {
			out.Entities[id] = rec
		}
		evs, err := s.Events(ctx, id, 1, 1<<62, 0)
		if err != nil {
			return out, err
		}
		out.Events[id] = evs
	}
	if _, err := s.EventsAfter(ctx, 0, 10_000); err != nil {
		return out, err
	}
	return out, nil
}

// corruptCopy copies the file at src (and its WAL, if any) to a new
// directory and returns the copy's path.
func corruptCopy(t testing.TB, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), filepath.Base(src))
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(src + suffix)
		if errors.Is(err, os.ErrNotExist) && suffix != "" {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst+suffix, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// corruptPage is one b-tree page of a closed file, as dbstat lists it.
type corruptPage struct {
	No   int64
	Type string // internal, leaf, overflow
}

// corruptLayout returns the page size and the pages of table name (in
// b-tree order) of a closed file.
func corruptLayout(t testing.TB, path, name string) (pageSize int64, pages []corruptPage) {
	t.Helper()
	db, err := sql.Open("sqlite", DSN(path, "query_only(1)"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.QueryRow(`PRAGMA page_size`).Scan(&pageSize); err != nil {
		t.Fatal(err)
	}
	rows, err := db.Query(`SELECT pageno, pagetype FROM dbstat WHERE name = ? ORDER BY path`, name)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var p corruptPage
		if err := rows.Scan(&p.No, &p.Type); err != nil {
			t.Fatal(err)
		}
		pages = append(pages, p)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return pageSize, pages
}

// corruptMiddleLeaf returns the middle leaf page of the events table: not
// on the path that SELECT MAX(pos) at open walks, so the damage there is
// found by a read of its rows or by Check, not by Open.
func corruptMiddleLeaf(t testing.TB, path string) (pageSize int64, page corruptPage) {
	t.Helper()
	pageSize, pages := corruptLayout(t, path, "events")
	var leaves []corruptPage
	for _, p := range pages {
		if p.Type == "leaf" {
			leaves = append(leaves, p)
		}
	}
	if len(leaves) < 10 {
		t.Fatalf("the events table has %d leaf pages; the test needs more", len(leaves))
	}
	return pageSize, leaves[len(leaves)/2]
}

// corruptFirstRowid returns the rowid (position) of the first cell of a
// table leaf page: b-tree page header, first cell pointer, then the cell's
// payload-size varint and rowid varint.
func corruptFirstRowid(t testing.TB, path string, pageSize int64, page corruptPage) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pg := b[(page.No-1)*pageSize : page.No*pageSize]
	if pg[0] != 0x0d {
		t.Fatalf("page %d is of type %#x, not a table leaf", page.No, pg[0])
	}
	cell := pg[binary.BigEndian.Uint16(pg[8:10]):]
	_, n := sqliteVarint(cell)
	rowid, _ := sqliteVarint(cell[n:])
	return int64(rowid)
}

// sqliteVarint decodes SQLite's big-endian varint (1 to 9 bytes).
func sqliteVarint(b []byte) (uint64, int) {
	var v uint64
	for i := 0; i < 8; i++ {
		v = v<<7 | uint64(b[i]&0x7f)
		if b[i]&0x80 == 0 {
			return v, i + 1
		}
	}
	return v<<8 | uint64(b[8]), 9
}

// corruptOpen opens the file with an OnCorrupt that counts its calls.
func corruptOpen(t testing.TB, path string) (*Shard, *atomic.Int32, error) {
	t.Helper()
	calls := &atomic.Int32{}
	s, err := Open(context.Background(), Config{Path: path, Context: "default", Shards: 1,
		OnCorrupt: func(error) { calls.Add(1) }})
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, calls, err
}

// TestCorruptCheckOnSoundFile is the detector's negative control: a sound
// file checks ok, and a flipped byte in the unused middle of a page (between
// its cell pointers and its cells) changes nothing: it is checked ok and
// every row reads back the same, which is what it is.
func TestCorruptCheckOnSoundFile(t *testing.T) {
	ctx := context.Background()
	pristine := filepath.Join(t.TempDir(), "shard-000.db")
	corruptBuild(t, pristine)
	s, calls, err := corruptOpen(t, corruptCopy(t, pristine))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Check(ctx); err != nil {
		t.Fatalf("Check of a sound file: %v", err)
	}
	want, err := corruptRead(ctx, s)
	if err != nil {
		t.Fatal(err)
	}

	path := corruptCopy(t, pristine)
	pageSize, page := corruptMiddleLeaf(t, path)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pg := b[(page.No-1)*pageSize:]
	cells := int64(binary.BigEndian.Uint16(pg[3:5]))
	content := int64(binary.BigEndian.Uint16(pg[5:7]))
	free := 8 + 2*cells // first byte after the cell pointer array
	if content-free < 8 {
		t.Fatalf("page %d has %d unused bytes; the test needs some", page.No, content-free)
	}
	damage.Flip(t, path, (page.No-1)*pageSize+(free+content)/2, 0x10)
	s2, calls2, err := corruptOpen(t, path)
	if err != nil {
		t.Fatalf("open after a flip in unused space: %v", err)
	}
	if err := s2.Check(ctx); err != nil {
		t.Fatalf("Check after a flip in unused space: %v", err)
	}
	got, err := corruptRead(ctx, s2)
	if err != nil {
		t.Fatalf("read after a flip in unused space: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatal("a flip in unused space changed what the shard reads")
	}
	if calls.Load()+calls2.Load() != 0 || s.Corrupt() != nil || s2.Corrupt() != nil {
		t.Fatal("a sound file was marked corrupt")
	}
	t.Logf("flipped byte %d of page %d (unused, %d bytes free there): checked ok, %d entities read back the same", (free+content)/2, page.No, content-free, len(got.Entities))
}

// TestCorruptEventsPage flips one bit of the page-type byte of an events
// leaf page: a read of a row on it fails with SQLITE_CORRUPT, which marks
// the shard corrupt (OnCorrupt once) and refuses commits; Check finds it
// too, without any read.
func TestCorruptEventsPage(t *testing.T) {
	ctx := context.Background()
	pristine := filepath.Join(t.TempDir(), "shard-000.db")
	corruptBuild(t, pristine)
	pageSize, page := corruptMiddleLeaf(t, pristine)
	pos := corruptFirstRowid(t, pristine, pageSize, page)
	var entity string
	{
		s, _, err := corruptOpen(t, corruptCopy(t, pristine))
		if err != nil {
			t.Fatal(err)
		}
		evs, err := s.EventsAfter(ctx, pos-1, 1)
		if err != nil || len(evs) != 1 {
			t.Fatalf("event at %d: %v %v", pos, evs, err)
		}
		entity = evs[0].Entity
	}

	t.Run("read", func(t *testing.T) {
		path := corruptCopy(t, pristine)
		damage.Flip(t, path, (page.No-1)*pageSize, 0x01) // 0x0d (table leaf) becomes 0x0c: no such page type
		s, calls, err := corruptOpen(t, path)
		if err != nil {
			t.Fatalf("Open: %v (the page is not on the path Open reads)", err)
		}
		_, err = s.Events(ctx, entity, 1, 1<<62, 0)
		if !IsCorrupt(err) {
			t.Fatalf("read of %s, whose event %d is on the damaged page: %v; want a corruption error", entity, pos, err)
		}
		if calls.Load() != 1 || !IsCorrupt(s.Corrupt()) {
			t.Fatalf("after the read: OnCorrupt called %d times, Corrupt() = %v; want once and the error", calls.Load(), s.Corrupt())
		}
		err = s.Commit(ctx, commitOf("new", 1, 1, time.Now()))
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("commit to a corrupt shard: %v; want ErrCorrupt", err)
		}
		if err := s.Check(ctx); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Check: %v; want ErrCorrupt", err)
		}
		if calls.Load() != 1 {
			t.Fatalf("OnCorrupt called %d times; want once", calls.Load())
		}
		t.Logf("page %d (events leaf, first position %d, entity %s): read error %q", page.No, pos, entity, err)
	})
	t.Run("check", func(t *testing.T) {
		path := corruptCopy(t, pristine)
		damage.Flip(t, path, (page.No-1)*pageSize, 0x01)
		s, calls, err := corruptOpen(t, path)
		if err != nil {
			t.Fatal(err)
		}
		err = s.Check(ctx)
		if !errors.Is(err, ErrCorrupt) || calls.Load() != 1 || s.Corrupt() == nil {
			t.Fatalf("Check = %v, OnCorrupt called %d times; want ErrCorrupt, once", err, calls.Load())
		}
		t.Logf("Check: %v", err)
	})
}

// TestCorruptNotADatabase flips a bit of the file header's magic string:
// Open fails with an error IsCorrupt recognises (SQLITE_NOTADB).
func TestCorruptNotADatabase(t *testing.T) {
	pristine := filepath.Join(t.TempDir(), "shard-000.db")
	corruptBuild(t, pristine)
	path := corruptCopy(t, pristine)
	damage.Flip(t, path, 0, 0x01) // "SQLite format 3" becomes "RQLite format 3"
	_, _, err := corruptOpen(t, path)
	if !IsCorrupt(err) {
		t.Fatalf("Open of a file whose header is damaged: %v; want a corruption error", err)
	}
	if _, _, err := corruptOpen(t, corruptCopy(t, pristine)); err != nil {
		t.Fatalf("Open of the sound copy: %v", err)
	}
	t.Logf("Open: %v", err)
}

// TestCorruptWALFrameDropsCommits documents what SQLite does with a flipped
// bit in the WAL of a shard that was not closed (a crash): the frame fails
// its checksum, and recovery keeps only the transactions committed before
// it. The commits after it vanish without an error, and the older database
// checks ok. The shard cannot tell; the shardnode does, by comparing the
// file's last position with the event stream's.
func TestCorruptWALFrameDropsCommits(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "shard-000.db")
	s, err := Open(ctx, Config{Path: path, Context: "default", Shards: 1})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 40; i++ {
		if err := s.Commit(ctx, commitOf(fmt.Sprintf("e%d", i%8), int64(i/8+1), 1, time.Now())); err != nil {
			t.Fatal(err)
		}
	}
	want := s.LastSeq()
	// The files as a crash right now would leave them: the WAL still holds
	// every commit (no checkpoint ran: they are far fewer than 1,000 pages).
	crashed := corruptCopy(t, path)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wal, err := os.ReadFile(crashed + "-wal")
	if err != nil {
		t.Fatal(err)
	}
	pageSize := int64(binary.BigEndian.Uint32(wal[8:12]))
	frameSize := 24 + pageSize
	frames := (int64(len(wal)) - 32) / frameSize
	var commits []int64 // frames that end a transaction
	for f := int64(0); f < frames; f++ {
		if binary.BigEndian.Uint32(wal[32+f*frameSize+4:]) != 0 {
			commits = append(commits, f)
		}
	}
	if len(commits) < 20 {
		t.Fatalf("the WAL has %d commit frames; want the 40 commits in it", len(commits))
	}
	// Damage the first frame after the middle commit.
	bad := commits[len(commits)/2] + 1
	intact := corruptCopy(t, crashed)
	damage.Flip(t, crashed+"-wal", 32+bad*frameSize+24+pageSize/2, 0x04)

	s2, calls, err := corruptOpen(t, crashed)
	if err != nil {
		t.Fatalf("Open after a WAL flip: %v", err)
	}
	got := s2.LastSeq()
	if err := s2.Check(ctx); err != nil {
		t.Fatalf("Check after a WAL flip: %v (SQLite was expected to see a sound, older database)", err)
	}
	if got >= want || calls.Load() != 0 {
		t.Fatalf("after a flip in WAL frame %d of %d: last position %d of %d, OnCorrupt called %d times; want fewer positions and no corruption seen",
			bad, frames, got, want, calls.Load())
	}
	// Control: the same files without the flip lose nothing.
	s3, _, err := corruptOpen(t, intact)
	if err != nil {
		t.Fatal(err)
	}
	if s3.LastSeq() != want {
		t.Fatalf("the unflipped crash copy reopens at %d, want %d", s3.LastSeq(), want)
	}
	t.Logf("flip in WAL frame %d of %d (%d commit frames): the shard reopens at position %d of %d; %d committed events dropped silently, quick_check ok",
		bad, frames, len(commits), got, want, want-got)
}

// TestCorruptRandomBits flips one random bit of one random page per round
// (seeded, so every run flips the same bits; every other round within the
// page's first 64 bytes) and sorts out what the shard
// makes of it: refused at open, found by Check or by a read (the shard is
// then marked corrupt), harmless (everything reads back the same), a
// changed payload (which the entity's AES-GCM tag refuses above this
// package), or a silent change of another field. A changed version or
// entity id is never silent: it must be found here or break the payload's
// AAD above. Times are not sealed: a changed time is silent, and the test
// reports how often that happened.
func TestCorruptRandomBits(t *testing.T) {
	ctx := context.Background()
	pristine := filepath.Join(t.TempDir(), "shard-000.db")
	corruptBuild(t, pristine)
	s, _, err := corruptOpen(t, corruptCopy(t, pristine))
	if err != nil {
		t.Fatal(err)
	}
	want, err := corruptRead(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(pristine)
	if err != nil {
		t.Fatal(err)
	}
	pageSize, _ := corruptLayout(t, pristine, "events")
	pages := st.Size() / pageSize
	outcomes := map[string]int{}
	const rounds = 24
	for round := 0; round <= rounds; round++ {
		path := corruptCopy(t, pristine)
		rng := mrand.New(mrand.NewPCG(7, uint64(round)))
		page := 2 + rng.Int64N(pages-1) // page 1 is the file header and schema
		// Most of a page is payload bytes; every other round aims at the
		// first 64 bytes, where page headers and cell pointers are.
		within := rng.Int64N(pageSize)
		if round%2 == 0 {
			within = rng.Int64N(64)
		}
		off := (page-1)*pageSize + within
		if round > 0 { // round 0 is the control: no flip
			damage.Flip(t, path, off, 1<<rng.IntN(8))
		}
		outcome, detail := corruptClassify(ctx, t, path, want)
		if round == 0 && outcome != "harmless" {
			t.Fatalf("the unflipped control classified as %s (%s)", outcome, detail)
		}
		if outcome == "silent" {
			t.Errorf("round %d, page %d, byte %d: %s", round, page, off%pageSize, detail)
		}
		if round > 0 {
			outcomes[outcome]++
		}
		t.Logf("round %d: page %d byte %d: %s %s", round, page, off%pageSize, outcome, detail)
	}
	t.Logf("%d random bit flips in a %d-page shard: %v", rounds, pages, outcomes)
}

// corruptClassify opens path and compares what it reads with want.
func corruptClassify(ctx context.Context, t *testing.T, path string, want corruptContent) (outcome, detail string) {
	s, calls, err := corruptOpen(t, path)
	switch {
	case IsCorrupt(err):
		return "detected", "at open: " + err.Error()
	case err != nil:
		// A damaged meta row reads as another shard's file: refused too.
		return "refused", err.Error()
	}
	if err := s.Check(ctx); err != nil {
		if !errors.Is(err, ErrCorrupt) || calls.Load() != 1 {
			t.Fatalf("Check: %v (OnCorrupt %d calls); want ErrCorrupt, once", err, calls.Load())
		}
		return "detected", "by Check"
	}
	got, err := corruptRead(ctx, s)
	if err != nil {
		if !IsCorrupt(err) || calls.Load() != 1 {
			t.Fatalf("read: %v (OnCorrupt %d calls); every read error of a damaged file must be a corruption", err, calls.Load())
		}
		return "detected", "by a read: " + err.Error()
	}
	if reflect.DeepEqual(got, want) {
		return "harmless", ""
	}
	var payloads, times int
	var other []string
	for id, w := range want.Entities {
		g, ok := got.Entities[id]
		switch {
		case !ok:
			other = append(other, id+": entity row gone")
		case g.Version != w.Version:
			other = append(other, fmt.Sprintf("%s: entity version %d, was %d", id, g.Version, w.Version))
		case g != w:
			times++
		}
	}
	for id, w := range want.Events {
		g := got.Events[id]
		if len(g) != len(w) {
			other = append(other, fmt.Sprintf("%s: %d events, was %d", id, len(g), len(w)))
			continue
		}
		for i := range w {
			switch {
			case g[i].Seq != w[i].Seq || g[i].Version != w[i].Version:
				other = append(other, fmt.Sprintf("%s: event %d at %d/v%d, was %d/v%d", id, i, g[i].Seq, g[i].Version, w[i].Seq, w[i].Version))
			case !bytes.Equal(g[i].Payload, w[i].Payload):
				payloads++
			case !g[i].Time.Equal(w[i].Time):
				times++
			}
		}
	}
	switch {
	case len(other) > 0:
		return "silent", fmt.Sprint(other)
	case payloads > 0:
		return "payload", fmt.Sprintf("%d payloads changed (AES-GCM refuses them above)", payloads)
	default:
		return "time", fmt.Sprintf("%d times changed (not sealed: a known limit)", times)
	}
}

// BenchmarkQuickCheck100MB measures Check on a shard file of about 100 MB
// (250,000 events of 400 bytes), the cost that decided where the
// shardnode runs it.
func BenchmarkQuickCheck100MB(b *testing.B) {
	ctx := context.Background()
	path := filepath.Join(b.TempDir(), "shard-000.db")
	s, err := Open(ctx, Config{Path: path, Context: "default", Shards: 1, Synchronous: SyncOff})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	now := time.Now()
	for c := 0; c < 2500; c++ {
		cm := &Commit{Entity: fmt.Sprintf("e%d", c%1000), CreatedAt: now}
		for i := 0; i < 100; i++ {
			p := make([]byte, 400)
			rand.Read(p)
			cm.Events = append(cm.Events, EventRow{Version: int64(c/1000*100 + i + 1), Payload: p, Time: now})
		}
		if err := s.Commit(ctx, cm); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := s.wdbExec(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		b.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := s.Check(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(st.Size())/1e6, "MB")
	b.ReportMetric(float64(st.Size())/1e6/(b.Elapsed().Seconds()/float64(b.N)), "MB/s")
}
