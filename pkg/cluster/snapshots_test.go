package cluster_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/nats-io/nats.go/jetstream"
)

// storeFilesWith lists the files of the NATS store that contain s.
func storeFilesWith(t *testing.T, dir, s string) []string {
	t.Helper()
	var hits []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // the server replaced it meanwhile (a .blk.tmp renamed)
		}
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(s)) {
			hits = append(hits, strings.TrimPrefix(path, dir))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hits
}

// waitGone waits until no file of the store holds s (erasing runs in the
// background), failing the test if that does not happen in 30 s.
func waitGone(t *testing.T, dir, s string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		hits := storeFilesWith(t, dir, s)
		if len(hits) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still in %v", s, hits)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// snapshotFile writes a shard copy of several chunks that carries marker.
func snapshotFile(t *testing.T, marker string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), marker+".db")
	b := bytes.Repeat([]byte(marker+strings.Repeat(".", 1000)), 400) // ~400 KB: several 128 KB chunks
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// downloads reports whether shard's snapshot in the default context, as
// downloaded from s, is the copy that carries marker (snapshotFile).
func downloads(t *testing.T, s *cluster.Store, shard int, marker string) bool {
	t.Helper()
	got := filepath.Join(t.TempDir(), "got.db")
	snap, ok, err := s.SnapshotInfo(t.Context(), "default", shard)
	if err != nil || !ok {
		t.Fatalf("snapshot info of shard %d: %v %v", shard, ok, err)
	}
	if err := s.GetSnapshot(t.Context(), snap, got); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(got)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.HasPrefix(b, []byte(marker))
}

// A download gets the copy its description was read from, never a newer
// one uploaded in between: a take decides from the description (its
// epoch, its positions) what to trust of the file.
func TestDownloadIsTheCopyDescribed(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, js, "a")
	ctx := t.Context()
	put := func(marker string, last int64) {
		t.Helper()
		if err := s.PutSnapshot(ctx, snapshotFile(t, marker), cluster.Snapshot{Context: "default", Shard: 2, Epoch: 1, LastSeq: last}); err != nil {
			t.Fatal(err)
		}
	}
	put("FIRST-k3d9", 10)
	described, ok, err := s.SnapshotInfo(ctx, "default", 2)
	if err != nil || !ok || described.LastSeq != 10 {
		t.Fatalf("snapshot info: %+v %v %v", described, ok, err)
	}
	got := filepath.Join(t.TempDir(), "got.db")
	if err := s.GetSnapshot(ctx, described, got); err != nil {
		t.Fatalf("download of the copy described, unchanged: %v", err)
	}
	// Two more uploads: the second takes the first copy's name.
	put("SECOND-p8w2", 20)
	put("THIRD-z5q7", 30)
	if err := os.Remove(got); err != nil {
		t.Fatal(err)
	}
	err = s.GetSnapshot(ctx, described, got)
	if !errors.Is(err, cluster.ErrSnapshotReplaced) {
		t.Fatalf("download of a copy replaced since it was described: %v, want ErrSnapshotReplaced", err)
	}
	if _, serr := os.Stat(got); !errors.Is(serr, os.ErrNotExist) {
		t.Fatalf("a refused download left %s behind: %v", got, serr)
	}
	if !downloads(t, s, 2, "THIRD-z5q7") {
		t.Fatal("described again, the snapshot downloaded is not the newest")
	}
	if err := s.GetSnapshot(ctx, cluster.Snapshot{Context: "default", Shard: 9}, got); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("download of a snapshot never described: %v, want not found", err)
	}
}

// A replaced or deleted snapshot leaves no byte of its chunks in the NATS
// store: a forgotten entity's id in an old copy of its shard must not
// outlive the copy that replaced it (purged chunks stay in the block files
// until they are compacted; erased ones are overwritten).
func TestReplacedSnapshotLeavesNoChunks(t *testing.T) {
	srv, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, js, "a")
	dir := srv.JetStreamConfig().StoreDir
	ctx := t.Context()

	markers := []string{"COPY-ONE-b7x1", "COPY-TWO-q9z4", "COPY-THREE-m2k8"}
	for i, m := range markers {
		if err := s.PutSnapshot(ctx, snapshotFile(t, m), cluster.Snapshot{Context: "default", Shard: 3, Epoch: 1, LastSeq: int64(10 * (i + 1))}); err != nil {
			t.Fatal(err)
		}
		// Another shard's snapshot shares the blocks and stays.
		if i == 0 {
			if err := s.PutSnapshot(ctx, snapshotFile(t, "NEIGHBOUR-c4v6"), cluster.Snapshot{Context: "default", Shard: 4, Epoch: 1, LastSeq: 5}); err != nil {
				t.Fatal(err)
			}
		}
		info, ok, err := s.SnapshotInfo(ctx, "default", 3)
		if err != nil || !ok || info.LastSeq != int64(10*(i+1)) {
			t.Fatalf("after upload %d: %+v %v %v", i+1, info, ok, err)
		}
		if !downloads(t, s, 3, m) {
			t.Fatalf("after upload %d the snapshot downloaded is not the last one uploaded", i+1)
		}
		if hits := storeFilesWith(t, dir, m); len(hits) == 0 {
			t.Fatalf("the live snapshot %s is in no file of the store: the check below would prove nothing", m)
		}
		// The replaced copy is erased in the background.
		for _, old := range markers[:i] {
			waitGone(t, dir, old)
		}
	}
	if err := s.DeleteSnapshot(ctx, "default", 3); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := s.SnapshotInfo(ctx, "default", 3); ok || err != nil {
		t.Fatalf("after delete: ok=%v err=%v", ok, err)
	}
	if hits := storeFilesWith(t, dir, markers[2]); len(hits) > 0 {
		t.Errorf("the deleted snapshot is still in %v", hits)
	}
	if info, ok, err := s.SnapshotInfo(ctx, "default", 4); !ok || err != nil || info.LastSeq != 5 {
		t.Fatalf("the neighbour's snapshot: %+v %v %v", info, ok, err)
	}
	if hits := storeFilesWith(t, dir, "NEIGHBOUR-c4v6"); len(hits) == 0 {
		t.Fatal("the neighbour's snapshot is gone from the store")
	}
}

// An older copy left beside the newest (an erase a stop cut short) is erased
// when a store opens.
func TestOpenErasesLeftoverSnapshot(t *testing.T) {
	srv, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	open(t, js, "a") // creates the bucket
	obs, err := js.ObjectStore(ctx, cluster.SnapshotsBucket)
	if err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"default/shard-2", "default/shard-2.b"} {
		f, err := os.Open(snapshotFile(t, []string{"LEFT-OVER-k3j5", "NEWEST-r8t2"}[i]))
		if err != nil {
			t.Fatal(err)
		}
		meta := jetstream.ObjectMeta{Name: name, Metadata: map[string]string{"generation": []string{"4", "5"}[i], "last_seq": []string{"40", "50"}[i]}}
		if _, err := obs.Put(ctx, meta, f); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	dir := srv.JetStreamConfig().StoreDir
	if len(storeFilesWith(t, dir, "LEFT-OVER-k3j5")) == 0 {
		t.Fatal("the leftover is in no file: the check below would prove nothing")
	}
	s := open(t, js, "b")
	waitGone(t, dir, "LEFT-OVER-k3j5")
	if info, ok, err := s.SnapshotInfo(ctx, "default", 2); !ok || err != nil || info.LastSeq != 50 {
		t.Fatalf("after the sweep: %+v %v %v, want the newest (last_seq 50)", info, ok, err)
	}
	if len(storeFilesWith(t, dir, "NEWEST-r8t2")) == 0 {
		t.Fatal("the sweep erased the newest copy")
	}
}

// An upload whose meta landed but whose chunks were purged (the object
// store purges them when an acknowledgement is lost) names a copy that is
// not there. It is newer by generation, but it is never the copy read, the
// sweep at open does not erase the whole copy beneath it, and the next
// upload takes its name.
func TestBrokenSnapshotIsNeverRead(t *testing.T) {
	srv, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	dir := srv.JetStreamConfig().StoreDir
	a := open(t, js, "a")
	if err := a.PutSnapshot(ctx, snapshotFile(t, "WHOLE-COPY-h5p2"), cluster.Snapshot{Context: "default", Shard: 3, Epoch: 1, LastSeq: 40}); err != nil {
		t.Fatal(err)
	}
	obs, err := js.ObjectStore(ctx, cluster.SnapshotsBucket)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, "OBJ_"+cluster.SnapshotsBucket)
	if err != nil {
		t.Fatal(err)
	}
	put := func(name, marker, gen, lastSeq string) *jetstream.ObjectInfo {
		t.Helper()
		f, err := os.Open(snapshotFile(t, marker))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		info, err := obs.Put(ctx, jetstream.ObjectMeta{Name: name, Metadata: map[string]string{"generation": gen, "last_seq": lastSeq}}, f)
		if err != nil {
			t.Fatal(err)
		}
		return info
	}
	broken := put("default/shard-3.b", "BROKEN-COPY-w8e3", "2", "50")
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject("$O."+cluster.SnapshotsBucket+".C."+broken.NUID)); err != nil {
		t.Fatal(err)
	}
	// Another shard's leftover, listed after the copies above: once the
	// sweep has erased it, it has passed over shard 3's.
	put("default/shard-7", "LEFT-OVER-n4c9", "1", "5")
	put("default/shard-7.b", "NEWEST-g2u6", "2", "6")

	b := open(t, js, "b") // sweeps
	waitGone(t, dir, "LEFT-OVER-n4c9")
	if len(storeFilesWith(t, dir, "WHOLE-COPY-h5p2")) == 0 {
		t.Fatal("the sweep erased the whole copy beneath a broken newer one")
	}
	for _, s := range []*cluster.Store{a, b} {
		info, ok, err := s.SnapshotInfo(ctx, "default", 3)
		if err != nil || !ok || info.LastSeq != 40 {
			t.Fatalf("snapshot info: %+v %v %v, want the whole copy (last_seq 40)", info, ok, err)
		}
		if !downloads(t, s, 3, "WHOLE-COPY-h5p2") {
			t.Fatal("the snapshot downloaded is not the whole copy")
		}
	}

	if err := b.PutSnapshot(ctx, snapshotFile(t, "NEXT-COPY-r7y1"), cluster.Snapshot{Context: "default", Shard: 3, Epoch: 2, LastSeq: 60}); err != nil {
		t.Fatal(err)
	}
	info, ok, err := a.SnapshotInfo(ctx, "default", 3)
	if err != nil || !ok || info.LastSeq != 60 {
		t.Fatalf("after the next upload: %+v %v %v, want last_seq 60", info, ok, err)
	}
	if got, err := obs.GetInfo(ctx, "default/shard-3.b"); err != nil || got.Metadata["last_seq"] != "60" || got.Metadata["generation"] != "3" {
		t.Fatalf("the next upload should take the broken copy's name with generation 3: %+v %v", got, err)
	}
	waitGone(t, dir, "WHOLE-COPY-h5p2") // replaced, so erased
}

// A put whose acknowledgements do not come (a stream changing leaders)
// fails within the client's request timeout and is tried again, instead of
// waiting for the caller's deadline: a hand-off waited for its whole two
// minutes that way, its shard unserved.
func TestSnapshotUploadOutlivesLostAcks(t *testing.T) {
	_, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	s := open(t, js, "a")
	stream, err := js.Stream(ctx, "OBJ_"+cluster.SnapshotsBucket)
	if err != nil {
		t.Fatal(err)
	}
	setNoAck := func(on bool) {
		t.Helper()
		cfg := stream.CachedInfo().Config
		cfg.NoAck = on
		if _, err := js.UpdateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	setNoAck(true)
	// Long enough for a retry after the request timeout (5 s), short
	// enough that the old code, waiting for acks that never come, fails.
	pctx, cancel := context.WithTimeout(ctx, 25*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- s.PutSnapshot(pctx, snapshotFile(t, "ACKS-LOST-d3f8"), cluster.Snapshot{Context: "default", Shard: 1, Epoch: 1, LastSeq: 9})
	}()
	time.Sleep(time.Second) // the first attempt is sent meanwhile, unacknowledged
	setNoAck(false)
	if err := <-done; err != nil {
		t.Fatalf("the upload did not survive a second of lost acknowledgements: %v", err)
	}
	info, ok, err := s.SnapshotInfo(ctx, "default", 1)
	if err != nil || !ok || info.LastSeq != 9 {
		t.Fatalf("after the upload: %+v %v %v", info, ok, err)
	}
	if !downloads(t, s, 1, "ACKS-LOST-d3f8") {
		t.Fatal("the snapshot downloaded is not the one uploaded")
	}
}
