package shardnode_test

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// Damage found below SQLite: a bit flipped in a WAL frame, which SQLite
// drops silently, and the helpers that find and flip it.

// corruptEventsLeaf finds the middle leaf page of the events table of a
// closed shard file and the entity of the first event on it.
func corruptEventsLeaf(t *testing.T, path string) (page, pageSize int64, entity string) {
	t.Helper()
	db, err := sql.Open("sqlite", sqlite.DSN(path, "query_only(1)"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.QueryRow(`PRAGMA page_size`).Scan(&pageSize); err != nil {
		t.Fatal(err)
	}
	rows, err := db.Query(`SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' ORDER BY path`)
	if err != nil {
		t.Fatal(err)
	}
	var leaves []int64
	for rows.Next() {
		var p int64
		if err := rows.Scan(&p); err != nil {
			t.Fatal(err)
		}
		leaves = append(leaves, p)
	}
	rows.Close()
	if len(leaves) < 5 {
		t.Fatalf("%s has %d events leaf pages; the test needs more", path, len(leaves))
	}
	page = leaves[len(leaves)/2]
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pg := b[(page-1)*pageSize : page*pageSize]
	cell := pg[binary.BigEndian.Uint16(pg[8:10]):] // first cell: payload size, rowid
	_, k := corruptVarint(cell)
	pos, _ := corruptVarint(cell[k:])
	if err := db.QueryRow(`SELECT entity FROM events WHERE pos = ?`, pos).Scan(&entity); err != nil {
		t.Fatal(err)
	}
	return page, pageSize, entity
}

// corruptVarint decodes SQLite's big-endian varint.
func corruptVarint(b []byte) (uint64, int) {
	var v uint64
	for i := 0; i < 8; i++ {
		v = v<<7 | uint64(b[i]&0x7f)
		if b[i]&0x80 == 0 {
			return v, i + 1
		}
	}
	return v<<8 | uint64(b[8]), 9
}

// corruptCrashCopy stops the node while a connection of the test holds
// shard files open, so that closing the node's own connections neither
// checkpoints nor removes their WALs, and returns each file's bytes and its
// WAL's as a crash at that moment would leave them.
func corruptCrashCopy(t *testing.T, n *kumatest.Node, paths ...string) (dbs, wals [][]byte) {
	t.Helper()
	var held []*sql.DB
	for _, p := range paths {
		db, err := sql.Open("sqlite", sqlite.DSN(p, "query_only(1)"))
		if err != nil {
			t.Fatal(err)
		}
		var x int
		if err := db.QueryRow(`SELECT COUNT(*) FROM meta`).Scan(&x); err != nil {
			t.Fatal(err)
		}
		held = append(held, db)
	}
	n.Stop()
	for _, p := range paths {
		db, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		wal, err := os.ReadFile(p + "-wal")
		if err != nil {
			t.Fatalf("no WAL left for %s: %v", p, err)
		}
		dbs, wals = append(dbs, db), append(wals, wal)
	}
	for _, db := range held {
		db.Close() // the last connection: it checkpoints; the copies are put back below
	}
	return dbs, wals
}

// corruptPutBack writes a crash copy over path and drops the shared memory,
// as a reboot would.
func corruptPutBack(t *testing.T, path string, db, wal []byte) {
	t.Helper()
	if err := os.WriteFile(path, db, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path+"-wal", wal, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path + "-shm"); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
}

// TestCorruptWALIsFoundAgainstTheStream flips one bit in a WAL frame of
// shard 2 as a crash left it. SQLite drops that frame and every commit
// after it without a word, and the older database it sees checks ok; the
// node finds the loss because the event stream holds positions the file no
// longer has, and takes the shard out of service. Shard 3's crash copy,
// put back unflipped, is the control: it serves everything.
func TestCorruptWALIsFoundAgainstTheStream(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	logs := &corruptLog{}
	n := corruptStart(t, dir, logs)
	c := n.Client(client.Options{})
	acked, byShard := corruptWriteAll(t, c, 4, 20, 200)
	corruptSettle(t, n)

	const bad, control = 2, 3
	badPath, controlPath := corruptShardFile(dir, bad), corruptShardFile(dir, control)
	dbs, wals := corruptCrashCopy(t, n, badPath, controlPath)
	wal := wals[0]
	pageSize := int64(binary.BigEndian.Uint32(wal[8:12]))
	frameSize := 24 + pageSize
	frames := (int64(len(wal)) - 32) / frameSize
	var commits []int64
	for f := int64(0); f < frames; f++ {
		if binary.BigEndian.Uint32(wal[32+f*frameSize+4:]) != 0 {
			commits = append(commits, f)
		}
	}
	if len(commits) < 8 {
		t.Fatalf("the WAL of shard %d has %d commit frames; want the appends in it", bad, len(commits))
	}
	badFrame := commits[len(commits)/2] + 1
	wal[32+badFrame*frameSize+24+pageSize/2] ^= 0x04
	corruptPutBack(t, badPath, dbs[0], wal)
	corruptPutBack(t, controlPath, dbs[1], wals[1])
	t.Logf("flipped a bit of WAL frame %d of %d (%d commits) of shard %d", badFrame, frames, len(commits), bad)

	n.Restart()
	c = n.Client(client.Options{})
	corruptWaitRefused(t, c, byShard[bad][0], bad)
	for _, e := range byShard[bad] {
		if err := corruptRefused(ctx, c, e, bad); err != nil {
			t.Fatal(err)
		}
	}
	if err := corruptOthers(ctx, c, acked, byShard, bad); err != nil {
		t.Fatalf("the other shards (the control among them): %v", err)
	}
	errs := logs.lines("level=ERROR", "shard file is corrupt", fmt.Sprintf("shard=%d", bad))
	if len(errs) != 1 || !strings.Contains(errs[0], "lost committed events") {
		t.Fatalf("ERROR lines about shard %d: %q; want one saying it lost committed events", bad, errs)
	}
	t.Logf("logged: %s", errs[0])

	n.Stop()
	corruptMoveAside(t, badPath)
	n.Restart()
	c = n.Client(client.Options{})
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("after the file was moved aside and rebuilt: %v", err)
	}
}
