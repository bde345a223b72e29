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
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
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
