package sqlite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func openTest(t testing.TB, path string, shards int) *Shard {
	t.Helper()
	s, err := Open(context.Background(), Config{Path: path, Context: "default", Shard: 0, Shards: shards})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func commitOf(entity string, from int64, n int, now time.Time) *Commit {
	c := &Commit{Entity: entity, CreatedAt: now}
	for i := 0; i < n; i++ {
		c.Events = append(c.Events, EventRow{Version: from + int64(i), Payload: []byte(`{"i":1}`), Time: now})
	}
	return c
}

func TestConcurrentCommitsAreDenseAndDurable(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "shard-000.db")
	s := openTest(t, path, 1)

	const writers, perWriter, batch = 20, 10, 7
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	now := time.Now().UTC()
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			entity := fmt.Sprintf("e%d", w)
			for i := 0; i < perWriter; i++ {
				c := commitOf(entity, int64(i*batch+1), batch, now)
				if err := s.Commit(ctx, c); err != nil {
					errs <- err
					return
				}
				if got, want := c.LastSeq-c.FirstSeq+1, int64(batch); got != want {
					errs <- fmt.Errorf("commit spans %d positions, want %d", got, want)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := int64(writers * perWriter * batch)
	if got := s.LastSeq(); got != total {
		t.Fatalf("LastSeq = %d, want %d", got, total)
	}
	st := s.Stats()
	if st.Groups > st.Commits || st.Events != total {
		t.Fatalf("stats = %+v, want %d events in at most %d groups", st, total, st.Commits)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Reopen: everything is there and the sequence continues.
	s = openTest(t, path, 1)
	defer s.Close()
	if got := s.LastSeq(); got != total {
		t.Fatalf("after reopen LastSeq = %d, want %d", got, total)
	}
	evs, err := s.Events(ctx, "e3", 1, 1<<62, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != perWriter*batch {
		t.Fatalf("e3 has %d events, want %d", len(evs), perWriter*batch)
	}
	for i, e := range evs {
		if e.Version != int64(i+1) {
			t.Fatalf("event %d has version %d", i, e.Version)
		}
	}
	rec, ok, err := s.Entity(ctx, "e3")
	if err != nil || !ok || rec.Version != int64(perWriter*batch) {
		t.Fatalf("Entity(e3) = %+v, %v, %v", rec, ok, err)
	}
}

func TestBadCommitDoesNotFailItsGroup(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, filepath.Join(t.TempDir(), "s.db"), 1)
	defer s.Close()
	now := time.Now()
	if err := s.Commit(ctx, commitOf("a", 1, 1, now)); err != nil {
		t.Fatal(err)
	}
	// Queue a duplicate version (a bug upstream) among good commits.
	var wg sync.WaitGroup
	results := make([]error, 10)
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if i == 5 {
				results[i] = s.Commit(ctx, commitOf("a", 1, 1, now))
				return
			}
			results[i] = s.Commit(ctx, commitOf(fmt.Sprintf("b%d", i), 1, 3, now))
		}(i)
	}
	wg.Wait()
	for i, err := range results {
		if i == 5 && err == nil {
			t.Fatal("duplicate version was accepted")
		}
		if i != 5 && err != nil {
			t.Fatalf("commit %d failed with its neighbour: %v", i, err)
		}
	}
	if got, want := s.LastSeq(), int64(1+9*3); got != want {
		t.Fatalf("LastSeq = %d, want %d (positions must stay dense after a failed commit)", got, want)
	}
}

func TestOpenRefusesOtherShardCount(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	s := openTest(t, path, 16)
	s.Close()
	_, err := Open(context.Background(), Config{Path: path, Context: "default", Shard: 0, Shards: 8})
	if err == nil || !strings.Contains(err.Error(), "shards=16") {
		t.Fatalf("Open with other shard count: err = %v, want a refusal naming shards=16", err)
	}
}

func TestCommitAfterClose(t *testing.T) {
	s := openTest(t, filepath.Join(t.TempDir(), "s.db"), 1)
	s.Close()
	if err := s.Commit(context.Background(), commitOf("a", 1, 1, time.Now())); err != ErrClosed {
		t.Fatalf("Commit after Close = %v, want ErrClosed", err)
	}
}

// BenchmarkGroupCommit measures the shard writer alone: 200 concurrent
// writers, batches of 100 events of ~200 bytes, synchronous=FULL. Reported
// as events/s.
func BenchmarkGroupCommit(b *testing.B) {
	for _, mode := range []string{SyncFull, SyncNormal} {
		b.Run("sync="+mode, func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(ctx, Config{Path: filepath.Join(b.TempDir(), "s.db"), Context: "default", Shards: 1, Synchronous: mode})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			data := []byte(`{"name":"Dwighson","role":"architect","email":"dwighson@example.com","team":"platform","level":7,"tags":["a","b","c"],"active":true,"note":"lorem ipsum dolor sit amet"}`)
			var next sync.Mutex
			versions := map[int]int64{}
			b.SetParallelism(100) // ×2 cores = 200 writers
			b.ResetTimer()
			var n int
			b.RunParallel(func(pb *testing.PB) {
				next.Lock()
				id := n
				n++
				next.Unlock()
				entity := fmt.Sprintf("bench-%d", id)
				for pb.Next() {
					next.Lock()
					v := versions[id]
					versions[id] = v + 100
					next.Unlock()
					c := &Commit{Entity: entity, CreatedAt: time.Now()}
					for i := int64(1); i <= 100; i++ {
						c.Events = append(c.Events, EventRow{Version: v + i, Payload: data, Time: time.Now()})
					}
					if err := s.Commit(ctx, c); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N*100)/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// A directory name with URI characters must open the file at that path.
func TestPathWithURICharacters(t *testing.T) {
	for i, name := range []string{"a#b", "a?b", "a%41b"} {
		dir := filepath.Join(t.TempDir(), name)
		path := filepath.Join(dir, "shard.db")
		s, err := Open(context.Background(), Config{Path: path, Context: "default", Shards: 1})
		if err != nil {
			t.Fatalf("%d: Open(%q): %v", i, path, err)
		}
		if err := s.Commit(context.Background(), commitOf("e", 1, 1, time.Now())); err != nil {
			t.Fatal(err)
		}
		s.Close()
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("%d: the shard is not at %q: %v", i, path, err)
		}
	}
}
