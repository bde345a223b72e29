package main

// The kill -9 part of the fault suite (issue 7): a real `kuma up` process
// under a 200-writer load is killed with SIGKILL and restarted on the same
// data dir, again and again; no acknowledged event may be lost or stored
// twice, every SQLite file must pass its integrity check, and the event
// stream must hold every event once, in order. crashCycles comes from
// faults_off_test.go (default suite) or faults_on_test.go (-tags faults).
//
// What a kill is not: a power cut. SIGKILL ends the process but keeps the
// kernel's page cache, so a write SQLite never fsynced still reaches the
// disk. This machine has no device-mapper (dm-log-writes, dm-flakey) and
// no VM to cut power to, so TestCrashKill9SyncNormal shows that even
// --sync NORMAL loses nothing under kill -9, and TestCrashKill9LostWALTail
// imitates what a power cut does to a WAL (its unsynced tail is gone) to
// show that the checker does see lost acknowledged events.

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	kumasqlite "github.com/kumadb/kuma/pkg/sqlite"
	_ "modernc.org/sqlite"
)

const (
	crashWriters = 200
	crashShards  = 4
	// crashAttempt bounds one append attempt: a request in flight when the
	// process dies gets no reply, and its writer should retry (same key)
	// soon after the restart rather than wait out a long timeout.
	crashAttempt = 2 * time.Second
)

// crashNode is one `kuma up` process on its own data dir and NATS port,
// killed and started again on both.
type crashNode struct {
	t        *testing.T
	dir      string
	port     int
	args     []string
	p        *proc
	restarts []time.Duration // kill to ready, per restart
}

func crashStartNode(t *testing.T, sync string) *crashNode {
	t.Helper()
	n := &crashNode{t: t, dir: filepath.Join(t.TempDir(), "data"), port: freePort(t)}
	n.args = []string{"up", "--data", n.dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(n.port),
		"--shards", strconv.Itoa(crashShards), "--sync", sync,
		"--metrics-listen", "127.0.0.1:0", "--console-listen", "", "--log-format", "text"}
	n.p = spawn(t, n.args)
	n.p.waitReady(t, 60*time.Second)
	return n
}

func (n *crashNode) url() string { return "nats://127.0.0.1:" + strconv.Itoa(n.port) }

// kill sends SIGKILL and waits for the process to be gone.
func (n *crashNode) kill() {
	n.t.Helper()
	if err := n.p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		n.t.Fatal(err)
	}
	_ = n.p.cmd.Wait()
	if ws, ok := n.p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		n.t.Fatalf("kuma up ended with %v, want killed by SIGKILL\n%s", n.p.cmd.ProcessState, tail(n.p.logs.String(), 40))
	}
}

// restart starts the process again on the same data dir and port and waits
// until it is ready.
func (n *crashNode) restart(killed time.Time) {
	n.t.Helper()
	n.p = spawn(n.t, n.args)
	n.p.waitReady(n.t, 90*time.Second)
	n.restarts = append(n.restarts, time.Since(killed))
}

func (n *crashNode) restartFigures() string {
	if len(n.restarts) == 0 {
		return "no restart"
	}
	s := append([]time.Duration(nil), n.restarts...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return fmt.Sprintf("kill to ready %s..%s (median %s)", s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond))
}

// faultSeed is a fault test's random seed: the one in the environment
// variable env replays a run, and without it each run draws its own.
func faultSeed(t *testing.T, env string) uint64 {
	t.Helper()
	if s := os.Getenv(env); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", env, s, err)
		}
		return seed
	}
	return uint64(time.Now().UnixNano())
}

// crashProgress remembers, per entity, the last version a check after a
// restart has seen in order: the next check reads from there (that event
// again, to see it is still there) instead of the whole history.
type crashProgress struct {
	verified map[string]int64
}

// afterRestart checks, for every writer, that its entity's versions are
// contiguous, each carrying its append once, up to at least what was
// acknowledged before the check began. The writers keep writing meanwhile;
// 16 entities are read at a time so that the check stays short under load.
func (p *crashProgress) afterRestart(ctx context.Context, l *load) *loadFindings {
	acked := l.ackedSnapshot()
	entities := make([]string, 0, len(acked))
	for e := range acked {
		entities = append(entities, e)
	}
	found := make([]loadFindings, len(entities))
	last := make([]int64, len(entities))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i, e := range entities {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			from := max(1, p.verified[e])
			last[i] = l.checkEntity(ctx, &found[i], e, from, acked[e], max(from, acked[e]))
		}()
	}
	wg.Wait()
	f := &loadFindings{}
	for i, e := range entities {
		f.add(&found[i])
		if found[i].ok() && last[i] >= max(1, p.verified[e]) {
			p.verified[e] = last[i]
		}
	}
	return f
}

// crashRunCycles runs cycles of: let the load run for 300 ms to 2 s, kill -9,
// restart, check what the writers had acknowledged. It fails the test on
// the first finding.
func crashRunCycles(t *testing.T, n *crashNode, l *load, rng *rand.Rand, cycles int) {
	t.Helper()
	p := &crashProgress{verified: map[string]int64{}}
	for c := 1; c <= cycles; c++ {
		run := 300*time.Millisecond + time.Duration(rng.Int64N(int64(1700*time.Millisecond)))
		before := l.acks.Load()
		time.Sleep(run)
		n.kill()
		killed := time.Now()
		l.interrupt()
		atKill := l.acks.Load()
		n.restart(killed)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		start := time.Now()
		f := p.afterRestart(ctx, l)
		cancel()
		t.Logf("cycle %d: ran %s (%d acknowledged), killed, ready again %s later; checked %d entities (%d events) in %s",
			c, run.Round(time.Millisecond), atKill-before, n.restarts[len(n.restarts)-1].Round(time.Millisecond),
			f.Entities, f.Events, time.Since(start).Round(time.Millisecond))
		if !f.ok() {
			t.Fatalf("after restart %d: %s\nlogs of the restarted process:\n%s", c, f, tail(n.p.logs.String(), 40))
		}
	}
}

// crashIntegrity runs PRAGMA integrity_check on the SQLite file at path,
// opened read-only, and returns its answer ("ok" when sound).
func crashIntegrity(ctx context.Context, path string) (string, error) {
	return crashIntegrityDSN(ctx, kumasqlite.DSN(path, "query_only(1)")+"&mode=ro")
}

// crashIntegrityOfCopy checks a copy of the file at path and its WAL, which
// SQLite may recover (a read-only open cannot when the -shm is gone).
func crashIntegrityOfCopy(ctx context.Context, path, dir string) (string, error) {
	dst := filepath.Join(dir, filepath.Base(path))
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil && !(suffix != "" && errors.Is(err, os.ErrNotExist)) {
			return "", err
		}
		if err := os.WriteFile(dst+suffix, b, 0o600); err != nil {
			return "", err
		}
	}
	return crashIntegrityDSN(ctx, kumasqlite.DSN(dst))
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

// crashDBFiles lists the SQLite files under a data dir: the shards, the
// keyvault's keys and the projector's catalog.
func crashDBFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(path, ".db") {
			out = append(out, path)
		}
		return nil
	})
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

// crashKill9 runs `kuma up --sync sync` under the load, kills and restarts
// it cycles times, then checks everything and prints the figures.
func crashKill9(t *testing.T, sync string, cycles int) {
	seed := faultSeed(t, "KUMA_CRASH_SEED")
	t.Logf("seed %d (KUMA_CRASH_SEED=%d replays the cycle lengths)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	start := time.Now()
	n := crashStartNode(t, sync)
	nc := connect(t, n.url())
	l := startLoad(t, nc, loadConfig{writers: crashWriters, shards: crashShards, attempt: crashAttempt})
	l.waitAcks(t, 200, 60*time.Second)
	crashRunCycles(t, n, l, rng, cycles)
	l.waitAcks(t, 200, 60*time.Second) // the load goes on after the last restart
	l.finish()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	stored, f := crashStored(ctx, l)
	if !f.ok() {
		t.Fatalf("acknowledged events lost or duplicated: %s", f)
	}
	total := crashSum(stored)
	if problems := crashStreamFindings(kumatest.StreamEvents(t, nc, kuma.DefaultContext, int(total)), stored); len(problems) > 0 {
		t.Fatalf("the event stream differs from the shards:\n%s", strings.Join(problems[:min(10, len(problems))], "\n"))
	}
	n.kill() // the files are checked as a crash leaves them
	files := crashCheckIntegrity(t, n.dir)
	ackedEvents := crashSum(l.ackedSnapshot())
	t.Logf("--sync %s, kill -9 cycles: %d; %s", sync, cycles, n.restartFigures())
	t.Logf("appends: %d requests sent (retries included), %d acknowledged (%d distinct appends), %d of them answered from the idempotency record (a retry of an append stored before the kill); failed attempts (retried) %d %v",
		l.attempts.Load(), l.acks.Load(), ackedEvents, l.dups.Load(), l.failures.Load(), l.errs)
	t.Logf("events stored %d (%d more than acknowledged: stored, but the writer stopped before its retry was answered); lost %d, duplicated %d, gaps %d (checked after each restart and in full at the end); the stream holds each once, in order; integrity_check ok on %d SQLite files; took %s",
		total, total-ackedEvents, f.Lost, f.Duplicated, f.Gaps, files, time.Since(start).Round(time.Millisecond))
}

// TestCrashKill9Cycles kills `kuma up` with SIGKILL under a 200-writer load
// crashCycles times, restarting it on the same data dir and port each time,
// and checks that every acknowledged event is there exactly once.
func TestCrashKill9Cycles(t *testing.T) {
	crashKill9(t, "FULL", crashCycles)
}

// TestCrashKill9SyncNormal is why the cycles above say nothing about a
// power cut: with --sync NORMAL a commit is not fsynced (the WAL is synced
// only at checkpoints), yet kill -9 loses nothing, because the kernel keeps
// the page cache of a killed process's writes. (--sync OFF does not exist:
// the config accepts FULL or NORMAL only.)
func TestCrashKill9SyncNormal(t *testing.T) {
	t.Log("control: --sync NORMAL must lose nothing under kill -9 either; the page cache outlives the process, so a kill is not a power cut")
	crashKill9(t, "NORMAL", max(1, crashCycles/5))
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
	for _, suffix := range []string{"", "-wal"} {
		b, err := os.ReadFile(path + suffix)
		if err != nil && !(suffix != "" && errors.Is(err, os.ErrNotExist)) {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst+suffix, b, 0o600); err != nil {
			t.Fatal(err)
		}
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

// TestCrashKill9LostWALTail is the negative control of the crash checks:
// after a kill -9, each shard's WAL loses its last commits, as a power cut
// does to commits never fsynced, and the checks must see what went with
// them.
//
// stream-kept: the event stream keeps what was published (the embedded
// JetStream server syncs every write), and a shard that finds its file
// behind the stream rebuilds it from there; what is lost is what was
// acknowledged but not yet published. That may happen to be nothing, so
// this case asserts only that what is left is consistent.
//
// stream-lost: the JetStream store is gone too, so nothing brings the cut
// commits back, and the checks must report acknowledged events lost: the
// checker's control. The integrity check's control runs there as well.
func TestCrashKill9LostWALTail(t *testing.T) {
	for _, dropStream := range []bool{false, true} {
		name := map[bool]string{false: "stream-kept", true: "stream-lost"}[dropStream]
		t.Run(name, func(t *testing.T) {
			n := crashStartNode(t, "FULL")
			nc := connect(t, n.url())
			l := startLoad(t, nc, loadConfig{writers: crashWriters, shards: crashShards, attempt: crashAttempt})
			l.waitAcks(t, 3000, 60*time.Second)
			n.kill()
			killed := time.Now()
			l.stop.Store(true)
			l.interrupt()
			l.finish()
			cut, kept := 0, 0
			for _, path := range crashDBFiles(t, n.dir) {
				if !strings.HasPrefix(filepath.Base(path), "shard-") {
					continue
				}
				c, k, err := crashCutWAL(path)
				if err != nil {
					t.Fatal(err)
				}
				// A power cut leaves a sound file behind (only shorter):
				// a cut that did not would test something else.
				if res, err := crashIntegrityOfCopy(t.Context(), path, t.TempDir()); err != nil || res != "ok" {
					t.Fatalf("%s after cutting %d of %d WAL commits: integrity_check %q, %v", path, c, c+k, res, err)
				}
				cut += c
				kept += k
			}
			if cut == 0 {
				t.Fatalf("no WAL held a commit to cut (%d kept): nothing to control", kept)
			}
			if dropStream {
				if err := os.RemoveAll(filepath.Join(n.dir, "nats")); err != nil {
					t.Fatal(err)
				}
			}
			n.restart(killed)

			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			p := &crashProgress{verified: map[string]int64{}}
			after := p.afterRestart(ctx, l)
			stored, full := crashStored(ctx, l)
			stream := kumatest.StreamEvents(t, nc, kuma.DefaultContext, int(crashSum(stored)))
			acked := map[string]int64{}
			l.mu.Lock()
			for e, v := range l.acked {
				acked[e] = v
			}
			l.mu.Unlock()
			t.Logf("cut %d of %d WAL commits over %d shards; %d appends acknowledged, %d events left", cut, cut+kept, crashShards, crashSum(acked), crashSum(stored))
			t.Logf("the check after the restart found: %s", after)
			t.Logf("the full check found: %s", full)
			if !dropStream {
				t.Logf("restart log:\n%s", tail(n.p.logs.String(), 12))
			}
			if !dropStream && full.Unreadable > 0 {
				// Kuma may refuse a shard whose file lacks events the
				// stream holds rather than serve it short: then every
				// request for its entities must say so (internal), and
				// none may answer with a history.
				if full.Unreadable != full.Codes[kuma.CodeInternal] {
					t.Fatalf("entities unreadable after the WAL cut for other reasons than a refused shard: %v", full.Codes)
				}
				if full.Duplicated+full.Gaps != 0 {
					t.Fatalf("the shards still served hold duplicates or gaps: %s", full)
				}
				t.Logf("the shards whose file is behind the stream are refused (internal): %d entities unreadable, %d served", full.Unreadable, full.Entities)
				return
			}
			if full.Duplicated+full.Gaps+full.Unreadable != 0 || after.Duplicated+after.Gaps+after.Unreadable != 0 {
				t.Errorf("what is left after losing a WAL tail is not a prefix of each entity's history")
			}
			if problems := crashStreamFindings(stream, stored); len(problems) > 0 {
				t.Errorf("the event stream differs from the shards:\n%s", strings.Join(problems[:min(10, len(problems))], "\n"))
			}
			if !dropStream {
				t.Logf("the shards were rebuilt from the stream: %d acknowledged appends lost (acknowledged, not yet published when killed)", full.Lost)
				return
			}
			// The duplicate check's control: an append of an event a
			// writer already stored, under a new key, as a retry that
			// missed its idempotency record would be.
			const entity = "w-000"
			last := stored[entity]
			if _, err := l.c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(`{"i":` + strconv.FormatInt(last-1, 10) + `}`)}},
				client.IdempotencyKey("crash-control-dup")); err != nil {
				t.Fatal(err)
			}
			dup := &loadFindings{}
			l.checkEntity(ctx, dup, entity, 1, last, 0)
			t.Logf("after appending %s's last event again: %s", entity, dup)
			if dup.Duplicated != 1 {
				t.Fatalf("the check saw %d duplicates, want 1", dup.Duplicated)
			}
			if after.Lost == 0 || full.Lost == 0 {
				t.Fatalf("the checks did not see the acknowledged events of %d cut commits: after the restart %s; in full %s", cut, after, full)
			}
			missing := crashStreamFindings(stream, acked)
			t.Logf("the stream check, against what was acknowledged: %d entities differ", len(missing))
			if len(missing) == 0 {
				t.Fatal("the stream check did not see acknowledged events missing from the stream")
			}
			n.kill()
			files := crashCheckIntegrity(t, n.dir)
			bad := crashCorruptCopy(t, crashDBFiles(t, filepath.Join(n.dir, kuma.DefaultContext))[0], t.TempDir())
			res, err := crashIntegrity(t.Context(), bad)
			t.Logf("integrity_check ok on %d files after the cut; on a copy with garbage pages: %.120q, %v", files, res, err)
			if err == nil && res == "ok" {
				t.Fatal("integrity_check passed a file with garbage pages")
			}
		})
	}
}
