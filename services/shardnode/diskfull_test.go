package shardnode_test

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// diskfullMount mounts a tmpfs of the given size on dir for the test, or
// skips it where mounting is not allowed (not root). The unmount is lazy, so
// a file still open cannot make it fail, and runs after the node's stop
// (cleanups run last registered first).
func diskfullMount(t *testing.T, dir, size string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Skipf("cannot mount a tmpfs on %s (needs root): %v", dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
}

// diskfullFree returns the bytes free on the file system holding dir.
func diskfullFree(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// diskfullCounter returns the value of counter name in the node's registry.
func diskfullCounter(t *testing.T, n *kumatest.Node, name string) float64 {
	t.Helper()
	fams, err := n.App.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

// TestDiskFullAppendsFailAndRecover puts the shard directory of a node on a
// small tmpfs (the keyvault and JetStream stay on the normal disk), fills it
// with appends to one shard, and checks: the append that finds the disk full
// answers internal "the disk is full" (no path), stores nothing and is
// acknowledged to nobody; reads go on; the file checks ok; appends succeed
// again as soon as space is freed, at the next position, without a
// restart; and after a restart the shard and the event stream hold exactly
// the acknowledged events.
func TestDiskFullAppendsFailAndRecover(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	shardDir := filepath.Join(dir, "default")
	diskfullMount(t, shardDir, "4m")
	logs := &corruptLog{}
	n := corruptStart(t, dir, logs)
	c := n.Client(client.Options{})

	// Leave about 512 KiB: a filler file takes the rest.
	filler := filepath.Join(shardDir, "filler")
	if err := os.WriteFile(filler, make([]byte, diskfullFree(t, shardDir)-512<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	const shard = 2
	ids := corruptEntities("full", shard, 4)
	acked := corruptAcked{}
	var lastSeq int64 // position of the shard's last acknowledged event
	appendOne := func(entity string) error {
		r, err := corruptAppend(ctx, c, acked, entity, 1, 8000)
		if err != nil {
			return err
		}
		p, perr := kuma.ParsePosition(r.Position)
		if perr != nil || p.Shard != shard || lastSeq > 0 && p.Seq != lastSeq+1 {
			t.Fatalf("append to %s acknowledged at %q (%v), the shard's last was %d", entity, r.Position, perr, lastSeq)
		}
		lastSeq = p.Seq
		return nil
	}

	var firstFull error
	for i := 0; firstFull == nil; i++ {
		if i == 1000 {
			t.Fatal("1,000 appends of 8 KB fit in 512 KiB")
		}
		firstFull = appendOne(ids[i%len(ids)])
	}
	fills := 0
	for _, e := range acked {
		fills += len(e)
	}
	// Every append to the shard is refused now, a new entity's too, with
	// the same answer.
	refusals := []error{firstFull}
	for _, e := range corruptEntities("full", shard, len(ids)+1) { // the last one is new
		_, err := corruptAppend(ctx, c, acked, e, 1, 8000)
		refusals = append(refusals, err)
	}
	const want = `shard 2 of "default": the disk is full; nothing was stored (retry once space is freed)`
	for i, err := range refusals {
		var kerr *kuma.Error
		if !errors.As(err, &kerr) || kerr.Code != kuma.CodeInternal || kerr.Message != want {
			t.Fatalf("refused append %d: %v; want internal %q", i, err, want)
		}
	}
	refused := len(refusals)

	// Reads go on and see exactly what was acknowledged; the file is sound.
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("while the disk is full: %v", err)
	}
	if err := diskfullIntegrity(filepath.Join(shardDir, "shard-002.db")); err != nil {
		t.Fatalf("while the disk is full: %v", err)
	}
	if got := logs.lines("level=ERROR", "the disk is full", "shard=2"); len(got) != 1 {
		t.Fatalf("ERROR lines about the full disk: %q; want one", got)
	}
	if got := diskfullCounter(t, n, "kuma_disk_full_total"); got != float64(refused) {
		t.Fatalf("kuma_disk_full_total = %v, want %d", got, refused)
	}

	// Free space: the next append succeeds at the next position.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		if err := appendOne(ids[i%len(ids)]); err != nil {
			t.Fatalf("append %d after space was freed: %v", i, err)
		}
	}
	if got := logs.lines("the shard writes again", "shard=2"); len(got) != 1 {
		t.Fatalf("log lines about the shard writing again: %q; want one", got)
	}
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("after freeing space: %v", err)
	}

	n.Restart()
	c = n.Client(client.Options{})
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("after a restart: %v", err)
	}
	total := 0
	for _, e := range acked {
		total += len(e)
	}
	streamed := kumatest.StreamEvents(t, n.NC, "default", total)
	for e, want := range acked {
		if got := streamed[e]; len(got) != len(want) {
			t.Fatalf("the stream holds %d events of %s, %d were acknowledged", len(got), e, len(want))
		}
	}

	// The checker sees an acknowledged event that is missing and one that
	// was never acknowledged.
	wrong := corruptAcked{ids[0]: append(acked[ids[0]][:len(acked[ids[0]]):len(acked[ids[0]])], acked[ids[0]][0])}
	if err := corruptVerify(ctx, c, wrong); err == nil {
		t.Fatal("corruptVerify accepted an acknowledged event the shard does not hold")
	}
	wrong[ids[0]] = acked[ids[0]][:len(acked[ids[0]])-1]
	if err := corruptVerify(ctx, c, wrong); err == nil {
		t.Fatal("corruptVerify accepted an event that was never acknowledged")
	}
	t.Logf("fills: %d appends of 8 KB before the disk was full, %d refused (internal %q), 0 acknowledged falsely; "+
		"8 more after freeing space at the next positions; %d events in shard, stream and reads after a restart",
		fills, refused, want, total)
}

// diskfullIntegrity runs PRAGMA integrity_check on a shard file, beside the
// node that has it open.
func diskfullIntegrity(path string) error {
	db, err := sql.Open("sqlite", sqlite.DSN(path, "query_only(1)"))
	if err != nil {
		return err
	}
	defer db.Close()
	var res string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&res); err != nil {
		return err
	}
	if res != "ok" {
		return errors.New("integrity_check: " + res)
	}
	return nil
}
