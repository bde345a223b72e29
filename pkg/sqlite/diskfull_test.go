package sqlite

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// diskfullMount mounts a tmpfs of the given size (mount's size= syntax) on
// dir for the test, or skips it where mounting is not allowed (not root).
// The mount goes before dir's own cleanup, and lazily, so a file still open
// cannot make it fail.
func diskfullMount(t *testing.T, dir, size string) {
	t.Helper()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Skipf("cannot mount a tmpfs on %s (needs root): %v", dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
}

// diskfullLog collects a shard's log lines.
type diskfullLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *diskfullLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *diskfullLog) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Count(l.buf.Bytes(), []byte(sub))
}

// diskfullVerify checks the shard against what was acknowledged: every
// acknowledged payload is there at its version, nothing else is, and the
// positions are dense from 1.
func diskfullVerify(ctx context.Context, s *Shard, acked map[string][][]byte) error {
	total := int64(0)
	for entity, want := range acked {
		total += int64(len(want))
		got, err := s.Events(ctx, entity, 1, 1<<62, 0)
		if err != nil {
			return err
		}
		if len(got) != len(want) {
			return fmt.Errorf("%s: %d events stored, %d acknowledged", entity, len(got), len(want))
		}
		for i, e := range got {
			if e.Version != int64(i+1) || !bytes.Equal(e.Payload, want[i]) {
				return fmt.Errorf("%s: event %d (version %d) is not the acknowledged one", entity, i+1, e.Version)
			}
		}
		rec, ok, err := s.Entity(ctx, entity)
		if err != nil || !ok || rec.Version != int64(len(want)) {
			return fmt.Errorf("%s: entity row %+v, %v, %v; want version %d", entity, rec, ok, err, len(want))
		}
	}
	if got := s.LastSeq(); got != total {
		return fmt.Errorf("last position %d, want %d (one per acknowledged event)", got, total)
	}
	all, err := s.EventsAfter(ctx, 0, int(total)+10)
	if err != nil {
		return err
	}
	if int64(len(all)) != total {
		return fmt.Errorf("%d events in the file, %d acknowledged", len(all), total)
	}
	for i, e := range all {
		if e.Seq != int64(i+1) {
			return fmt.Errorf("position %d where %d was due: positions are not dense", e.Seq, i+1)
		}
	}
	return nil
}

// TestDiskFullWriterRecovers fills the disk under a shard: the failing
// commits report IsFull and store nothing, the writer and its positions
// stay consistent, reads go on, and commits succeed again once space is
// freed, without reopening, and after reopening.
func TestDiskFullWriterRecovers(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	diskfullMount(t, dir, "1m")
	filler := filepath.Join(dir, "filler")
	if err := os.WriteFile(filler, make([]byte, 256<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "shard-000.db")
	logs := &diskfullLog{}
	cfg := Config{Path: path, Context: "default", Shards: 1, Logger: slog.New(slog.NewTextHandler(logs, nil))}
	s, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()

	acked := map[string][][]byte{}
	commit := func(entity string) error {
		payload := make([]byte, 3000)
		rand.Read(payload)
		v := int64(len(acked[entity]) + 1)
		c := &Commit{Entity: entity, CreatedAt: time.Now(), Events: []EventRow{{Version: v, Payload: payload, Time: time.Now()}}}
		if err := s.Commit(ctx, c); err != nil {
			return err
		}
		if want := s.LastSeq(); c.LastSeq != want {
			return fmt.Errorf("commit at position %d, shard at %d", c.LastSeq, want)
		}
		acked[entity] = append(acked[entity], payload)
		return nil
	}

	// Fill: one entity at a time until the disk refuses.
	var firstFull error
	for i := 0; firstFull == nil; i++ {
		if i == 10_000 {
			t.Fatal("10,000 commits fit in a 1 MiB tmpfs")
		}
		if err := commit(fmt.Sprintf("e%d", i%5)); err != nil {
			firstFull = err
		}
	}
	if !IsFull(firstFull) || IsCorrupt(firstFull) {
		t.Fatalf("the commit that found the disk full failed with %v; want IsFull", firstFull)
	}
	before := s.LastSeq()
	// A burst of concurrent commits, so that a whole group fails and is
	// retried one by one: every one must fail, none may move the position.
	var wg sync.WaitGroup
	burst := make([]error, 8)
	for i := range burst {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c := &Commit{Entity: fmt.Sprintf("burst%d", i), CreatedAt: time.Now(),
				Events: []EventRow{{Version: 1, Payload: make([]byte, 3000), Time: time.Now()}}}
			burst[i] = s.Commit(ctx, c)
		}(i)
	}
	wg.Wait()
	full := 1
	for i, err := range burst {
		if !IsFull(err) {
			t.Fatalf("burst commit %d while full: %v; want IsFull", i, err)
		}
		full++
	}
	if got := s.LastSeq(); got != before {
		t.Fatalf("failed commits moved the position from %d to %d", before, got)
	}
	// Reads go on while the disk is full, and see exactly what was acknowledged.
	if err := diskfullVerify(ctx, s, acked); err != nil {
		t.Fatalf("while full: %v", err)
	}
	if s.Corrupt() != nil {
		t.Fatalf("a full disk marked the shard corrupt: %v", s.Corrupt())
	}
	if problems, err := quickCheck(ctx, path); err != nil || len(problems) > 0 {
		t.Fatalf("quick_check while full: %v %v", problems, err)
	}

	// Free space: the same shard writes again, at the next position.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := commit("e0"); err != nil {
		t.Fatalf("commit after space was freed: %v", err)
	}
	if got, want := s.LastSeq(), before+1; got != want {
		t.Fatalf("first commit after the full disk is at %d, want %d", got, want)
	}
	for i := 0; i < 5; i++ {
		if err := commit(fmt.Sprintf("after%d", i)); err != nil {
			t.Fatalf("commit %d after space was freed: %v", i, err)
		}
	}
	if err := diskfullVerify(ctx, s, acked); err != nil {
		t.Fatalf("after freeing space: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := diskfullVerify(ctx, s, acked); err != nil {
		t.Fatalf("after reopening: %v", err)
	}
	if problems, err := quickCheck(ctx, path); err != nil || len(problems) > 0 {
		t.Fatalf("quick_check after reopening: %v %v", problems, err)
	}

	// The checker sees a missing and an extra acknowledgement.
	var last string
	for e := range acked {
		last = e
	}
	missing := map[string][][]byte{}
	for e, p := range acked {
		missing[e] = p
	}
	missing[last] = append(missing[last][:len(missing[last]):len(missing[last])], []byte("never stored"))
	if err := diskfullVerify(ctx, s, missing); err == nil {
		t.Fatal("diskfullVerify accepted an acknowledged event the shard does not hold")
	}
	missing[last] = acked[last][:len(acked[last])-1]
	if err := diskfullVerify(ctx, s, missing); err == nil {
		t.Fatal("diskfullVerify accepted an event that was never acknowledged")
	}
	var n int
	for _, p := range acked {
		n += len(p)
	}
	t.Logf("acknowledged %d events in %d entities; %d commits refused as full (first: %v); false acks 0; log: %d commit failures, %d failed rollbacks",
		n, len(acked), full, firstFull, logs.count("commit failed"), logs.count("rollback failed"))
	if n := logs.count("rollback failed"); n > 0 {
		t.Errorf("%d rollbacks logged as failed: a COMMIT refused as full rolls back by itself", n)
	}
}
