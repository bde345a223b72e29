package sqlite

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/damage"
)

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
