package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
	kumasqlite "github.com/kumadb/kuma/pkg/sqlite"
)

// crashIntegrity runs PRAGMA integrity_check on the SQLite file at path,
// opened read-only, and returns its answer ("ok" when sound).
func crashIntegrity(ctx context.Context, path string) (string, error) {
	return crashIntegrityDSN(ctx, kumasqlite.DSN(path, "query_only(1)")+"&mode=ro")
}

// crashIntegrityOfCopy checks a copy of the file at path and its WAL, which
// SQLite may recover (a read-only open cannot when the -shm is gone).
func crashIntegrityOfCopy(ctx context.Context, path, dir string) (string, error) {
	dst := filepath.Join(dir, filepath.Base(path))
	if err := copyWithWAL(path, dst); err != nil {
		return "", err
	}
	return crashIntegrityDSN(ctx, kumasqlite.DSN(dst))
}

// copyWithWAL copies the SQLite file at path to dst, and its WAL if it has
// one (an empty one if not), leaving the -shm behind.
func copyWithWAL(path, dst string) error {
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil && !(suffix != "" && errors.Is(err, os.ErrNotExist)) {
			return err
		}
		if err := os.WriteFile(dst+suffix, b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func crashIntegrityDSN(ctx context.Context, dsn string) (string, error) {
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return "", err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, `PRAGMA integrity_check`)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return "", err
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return "", err
	}
	return strings.Join(out, "; "), nil
}

// sqliteFiles lists the SQLite files under a data dir: the shards, the
// keyvault's keys and the projector's catalog. The NATS store under nats/
// is left out: its index.db files are nats-server's own format, not SQLite.
// The crash and failpoint suites both check what it lists.
func sqliteFiles(dir string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case d.IsDir() && d.Name() == "nats":
			return filepath.SkipDir
		case !d.IsDir() && strings.HasSuffix(path, ".db"):
			out = append(out, path)
		}
		return nil
	})
	return out, err
}

// crashDBFiles is sqliteFiles, failing the test when dir cannot be read.
func crashDBFiles(t *testing.T, dir string) []string {
	t.Helper()
	out, err := sqliteFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// crashCheckIntegrity checks every SQLite file under dir and returns how
// many there were; any answer but "ok" fails the test.
func crashCheckIntegrity(t *testing.T, dir string) int {
	t.Helper()
	files := crashDBFiles(t, dir)
	shards := 0
	for _, path := range files {
		res, err := crashIntegrity(t.Context(), path)
		if err != nil || res != "ok" {
			t.Errorf("integrity_check of %s: %q, %v", path, res, err)
		}
		if strings.HasPrefix(filepath.Base(path), "shard-") {
			shards++
		}
	}
	if shards != crashShards {
		t.Fatalf("found %d shard files under %s, want %d: %v", shards, dir, crashShards, files)
	}
	return len(files)
}

// crashStreamFindings compares the event stream (entity → events in stream
// order) with what the entities hold (entity → last version): each entity's
// events once each, versions 1..last in order. It returns the problems.
func crashStreamFindings(stream map[string][]kuma.StreamEvent, stored map[string]int64) []string {
	var out []string
	for entity, last := range stored {
		got := stream[entity]
		if int64(len(got)) != last {
			out = append(out, fmt.Sprintf("%s: the stream holds %d events, the shard %d", entity, len(got), last))
			continue
		}
		for k, e := range got {
			if e.Version != int64(k+1) {
				out = append(out, fmt.Sprintf("%s: stream event %d is version %d, want %d", entity, k, e.Version, k+1))
				break
			}
		}
	}
	for entity := range stream {
		if _, ok := stored[entity]; !ok {
			out = append(out, fmt.Sprintf("%s: in the stream, not in the shards", entity))
		}
	}
	sort.Strings(out)
	return out
}

// crashStored reads every writer's entity in full and returns entity → last
// version, with what the check found.
func crashStored(ctx context.Context, l *load) (map[string]int64, *loadFindings) {
	f := &loadFindings{}
	stored := map[string]int64{}
	for entity, n := range l.ackedSnapshot() {
		stored[entity] = l.checkEntity(ctx, f, entity, 1, n, 0)
	}
	return stored, f
}

func crashSum(m map[string]int64) int64 {
	total := int64(0)
	for _, v := range m {
		total += v
	}
	return total
}

// crashCutWAL does to the WAL of the SQLite file at dbPath what a power cut
// does to writes never fsynced: the later half of its commits not yet
// checkpointed into the database file (at least one, if there is any) is
// gone. It removes the -shm index too, so that SQLite rebuilds it from what
// is left, and returns the commits cut and kept.
func crashCutWAL(dbPath string) (cut, kept int, err error) {
	wal, err := os.ReadFile(dbPath + "-wal")
	if errors.Is(err, os.ErrNotExist) || len(wal) < 32 {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	// The WAL format (sqlite.org/fileformat2.html#walformat): a 32-byte
	// header, then frames of a 24-byte header and a page. A frame belongs
	// to the current generation of the file when it carries the header's
	// salts; a commit frame has a non-zero database size.
	pageSize := int(binary.BigEndian.Uint32(wal[8:12]))
	salts := wal[16:24]
	// Frames a checkpoint has copied, or begun to copy, into the database
	// file (nBackfill at byte 96 of the -shm, nBackfillAttempted at byte
	// 128, in the machine's byte order: little-endian here). A power cut
	// never loses those, since a checkpoint syncs the WAL before it writes
	// the database file; cutting them would leave the file ahead of its
	// WAL, which is corruption, not loss.
	backfill := 0
	if shm, err := os.ReadFile(dbPath + "-shm"); err == nil && len(shm) >= 132 {
		backfill = int(max(binary.LittleEndian.Uint32(shm[96:100]), binary.LittleEndian.Uint32(shm[128:132])))
	}
	var ends []int // file offset just after each commit frame
	var frames []int
	size := 24 + pageSize
	for off, i := 32, 1; off+size <= len(wal); off, i = off+size, i+1 {
		h := wal[off : off+24]
		if !bytes.Equal(h[8:16], salts) {
			break
		}
		if binary.BigEndian.Uint32(h[4:8]) != 0 {
			ends = append(ends, off+size)
			frames = append(frames, i)
		}
	}
	first := sort.Search(len(frames), func(k int) bool { return frames[k] > backfill })
	keep := first + (len(ends)-first)/2
	if keep == len(ends) {
		return 0, keep, nil
	}
	end := 32
	if keep > 0 {
		end = ends[keep-1]
	}
	if err := os.Truncate(dbPath+"-wal", int64(end)); err != nil {
		return 0, 0, err
	}
	if err := os.Remove(dbPath + "-shm"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, 0, err
	}
	return len(ends) - keep, keep, nil
}

// crashCorruptCopy copies the SQLite file at path (with its WAL) into dir,
// folds the WAL in, and overwrites every third page past the first with
// garbage: a file the integrity check must refuse.
func crashCorruptCopy(t *testing.T, path, dir string) string {
	t.Helper()
	dst := filepath.Join(dir, "corrupt.db")
	if err := copyWithWAL(path, dst); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", kumasqlite.DSN(dst))
	if err != nil {
		t.Fatal(err)
	}
	var pageSize, pages int64
	if _, err := db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow(`PRAGMA page_size`).Scan(&pageSize); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow(`PRAGMA page_count`).Scan(&pages); err != nil {
		t.Fatal(err)
	}
	db.Close()
	f, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	junk := bytes.Repeat([]byte{0xA5}, int(pageSize))
	for p := int64(1); p < pages; p += 3 {
		if _, err := f.WriteAt(junk, p*pageSize); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}
