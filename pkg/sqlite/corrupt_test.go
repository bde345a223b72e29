package sqlite

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
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
