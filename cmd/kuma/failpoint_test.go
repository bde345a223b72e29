package main

// The failpoint part of the fault suite: `kuma up` kills itself (SIGKILL,
// KUMA_TEST_FAILPOINT=point@N) at the Nth hit of a named point inside a
// risky sequence while writers keep appending, is started again, and the
// writers finish. Then every acknowledged append must be stored exactly
// once, versions contiguous, every shard file must pass PRAGMA
// integrity_check, and the event stream must hold every stored event
// exactly once. failpointRuns (faults_on_test.go / faults_off_test.go) is
// how many runs each point gets.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go"
)

const (
	fpWriterCount = 32
	fpVictimCount = 8
	// fpAttempt bounds one append attempt: a request in flight when the
	// process dies gets no reply, and the writer should retry (same key)
	// soon after the restart rather than wait long.
	fpAttempt = time.Second
	// fpGiveUp is how long one append may stay unacknowledged before its
	// writer gives up and the run fails.
	fpGiveUp = 90 * time.Second
	// fpHitWithin bounds the wait for the failpoint: not reaching it is a
	// failure, never a skip.
	fpHitWithin = 60 * time.Second
)

// fpPoint is a failpoint and how far into a run its hit may land: a run's
// N is drawn from [1, maxHit].
type fpPoint struct {
	name   string
	maxHit int
	forget bool // the run forgets entities while the writers write
}

// fpSingleNodePoints are the points one `kuma up` passes through. The
// commit points count groups of appends, append-after-ack appends answered
// before the relay published them, the relay points publishes, the forget
// points forgets (fpVictimCount are made).
func fpSingleNodePoints() []fpPoint {
	return []fpPoint{
		{name: "commit-before", maxHit: 300},
		{name: "commit-after", maxHit: 300},
		{name: "append-after-ack", maxHit: 300},
		{name: "relay-before-publish", maxHit: 100},
		{name: "relay-after-publish", maxHit: 100},
		{name: "forget-after-mark", maxHit: fpVictimCount - 2, forget: true},
		{name: "forget-after-shred", maxHit: fpVictimCount - 2, forget: true},
	}
}

// fpFigures are one run's (or the sum of a point's runs') counts: what the
// harness's checker found in the writers' entities, and the rest.
type fpFigures struct {
	loadFindings
	runs        int
	acked       int64 // appends acknowledged to the writers
	unpublished int64 // stored events missing from the stream
	streamDup   int64 // stored events the stream holds more than once
	forgotten   int   // entities forgotten and answering entity_forgotten
	files       int   // .db files that passed integrity_check (crash state and end)
	problems    []string
}

func (f *fpFigures) add(o fpFigures) {
	f.loadFindings.add(&o.loadFindings)
	f.runs += o.runs
	f.acked += o.acked
	f.unpublished += o.unpublished
	f.streamDup += o.streamDup
	f.forgotten += o.forgotten
	f.files += o.files
	f.problems = append(f.problems, o.problems...)
}

func (f *fpFigures) problem(format string, args ...any) {
	f.problems = append(f.problems, fmt.Sprintf(format, args...))
}

func (f *fpFigures) String() string {
	return fmt.Sprintf("runs %d, appends acknowledged %d, events stored %d, lost %d, duplicated %d, out of sequence %d, unacknowledged %d, unpublished %d, twice in the stream %d, forgotten %d, SQLite files integrity-checked %d",
		f.runs, f.acked, f.Events, f.Lost, f.Duplicated, f.Gaps, f.Unacked, f.unpublished, f.streamDup, f.forgotten, f.files)
}

// fpCheckStream compares what the shards store with what the stream holds:
// every stored event of the writers' entities exactly once, nothing else
// of them.
func fpCheckStream(stored map[string][]kuma.RecordedEvent, stream map[string][]kuma.StreamEvent, f *fpFigures) {
	for entity, events := range stored {
		count := map[int64]int{}
		for _, e := range stream[entity] {
			count[e.Version]++
		}
		for _, e := range events {
			switch n := count[e.Version]; {
			case n == 0:
				f.unpublished++
			case n > 1:
				f.streamDup += int64(n - 1)
			}
			delete(count, e.Version)
		}
		for v := range count {
			f.problem("%s: the stream holds version %d, which no shard stores", entity, v)
		}
	}
}

// fpStreamMatches waits (up to 30 s) for the relay to publish what the
// shards store, and records what is still missing or repeated.
func fpStreamMatches(t *testing.T, nc *nats.Conn, stored map[string][]kuma.RecordedEvent, f *fpFigures) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var g fpFigures
		fpCheckStream(stored, kumatest.StreamEvents(t, nc, kuma.DefaultContext, 0), &g)
		if (g.unpublished == 0 && g.streamDup == 0 && len(g.problems) == 0) || time.Now().After(deadline) {
			f.unpublished += g.unpublished
			f.streamDup += g.streamDup
			f.problems = append(f.problems, g.problems...)
			return
		}
	}
}

// fpVerify reads back every writer's entity and the victims, and compares
// the stream.
func fpVerify(t *testing.T, nc *nats.Conn, l *load, victims []string, f *fpFigures) {
	t.Helper()
	stored := map[string][]kuma.RecordedEvent{}
	for entity, acked := range l.ackedSnapshot() {
		events, err := history(t.Context(), l.c, entity, 1, 0)
		if err != nil {
			t.Fatalf("%s: %v", entity, err)
		}
		stored[entity] = events
		checkEvents(&f.loadFindings, entity, 1, acked, events, true)
		f.acked += acked
	}
	for _, v := range victims {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := l.c.Read(ctx, v)
		cancel()
		if !errors.Is(err, kuma.ErrEntityForgotten) {
			f.problem("read of forgotten %s: %v, want entity_forgotten", v, err)
			continue
		}
		f.forgotten++
	}
	fpStreamMatches(t, nc, stored, f)
}

// fpIntegrity runs PRAGMA integrity_check on every SQLite file under dir
// (sqliteFiles) and returns how many passed; each failure is a problem, and
// so is finding no shard file when wantShards.
func fpIntegrity(ctx context.Context, dir string, wantShards bool, f *fpFigures) int {
	paths, err := sqliteFiles(dir)
	if err != nil {
		f.problem("list the SQLite files under %s: %v", dir, err)
	}
	shards := 0
	for _, p := range paths {
		if strings.HasPrefix(filepath.Base(p), "shard-") {
			shards++
		}
	}
	if shards == 0 && wantShards {
		f.problem("no shard file under %s", dir)
	}
	ok := 0
	for _, p := range paths {
		if err := fpIntegrityOf(ctx, p); err != nil {
			f.problem("%v", err)
			continue
		}
		ok++
	}
	return ok
}

// fpIntegrityOf fails unless integrity_check answers "ok" for the file at
// path (opened as the node opens it: after a kill, it may recover the WAL).
func fpIntegrityOf(ctx context.Context, path string) error {
	res, err := crashIntegrityDSN(ctx, sqlite.DSN(path, "busy_timeout(10000)"))
	if err != nil {
		return fmt.Errorf("integrity_check of %s: %w", path, err)
	}
	if res != "ok" {
		return fmt.Errorf("integrity_check of %s: %s", path, res)
	}
	return nil
}

// fpWaitKilled waits for the process to die and checks that it killed
// itself at the point: SIGKILL, and the failpoint's line on its stderr.
func fpWaitKilled(t *testing.T, cmd *exec.Cmd, logs *logBuffer, point string, n int, l *load) time.Duration {
	t.Helper()
	start := time.Now()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	select {
	case <-exited:
	case <-time.After(fpHitWithin):
		t.Fatalf("%s@%d not reached within %s (%d appends acknowledged)\n%s", point, n, fpHitWithin, l.acks.Load(), tail(logs.String(), 20))
	}
	<-logs.closed
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("kuma ended with %v, want killed by SIGKILL at %s@%d\n%s", cmd.ProcessState, point, n, tail(logs.String(), 20))
	}
	if want := fmt.Sprintf("kuma: failpoint %s reached (hit %d)", point, n); !strings.Contains(logs.String(), want) {
		t.Fatalf("killed, but not at the failpoint: no %q in its stderr\n%s", want, tail(logs.String(), 20))
	}
	return time.Since(start)
}

// fpLoadConfig is the failpoint suite's load: fpWriterCount writers, short
// attempts retried with their key (none with dropKeyOnRetry) until
// fpGiveUp, each writer waiting pace between appends.
func fpLoadConfig(dropKeyOnRetry bool, pace time.Duration, shards int) loadConfig {
	return loadConfig{writers: fpWriterCount, shards: shards, attempt: fpAttempt, prefix: "fp-w", pace: pace, giveUp: fpGiveUp, dropKeyOnRetry: dropKeyOnRetry}
}

// fpRunSingle is one run of a single-node point: kill at point@n under
// load, restart, finish, check.
func fpRunSingle(t *testing.T, p fpPoint, n int, dropKeyOnRetry bool) fpFigures {
	f := fpFigures{runs: 1}
	dir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	cmd, logs := startUp(t, dir, port, "KUMA_TEST_FAILPOINT="+p.name+"@"+strconv.Itoa(n))
	nc := connect(t, "nats://127.0.0.1:"+strconv.Itoa(port))
	l := startLoad(t, nc, fpLoadConfig(dropKeyOnRetry, 0, 4))
	var victims []string
	if p.forget {
		victims = makeVictims(t, l.c, fpVictimCount)
		l.forgetter(victims)
	}
	hit := fpWaitKilled(t, cmd, logs, p.name, n, l)
	ackedAtKill := l.acks.Load()
	f.files += fpIntegrity(t.Context(), dir, true, &f) // the files as the crash left them

	restart := time.Now()
	cmd, logs = startUp(t, dir, port)
	l.waitAcks(t, 2*fpWriterCount, 60*time.Second)
	back := time.Since(restart)
	l.finishWithin(t, fpGiveUp+30*time.Second)
	fpVerify(t, nc, l, victims, &f)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("kuma up after SIGTERM: %v\n%s", err, tail(logs.String(), 20))
	}
	f.files += fpIntegrity(t.Context(), dir, true, &f)
	t.Logf("%s@%d: hit after %s with %d appends acknowledged; writers going again %s after the restart; %s; retried attempts %d",
		p.name, n, hit.Round(time.Millisecond), ackedAtKill, back.Round(time.Millisecond), f.String(), l.failures.Load())
	return f
}

// TestFailpoints kills `kuma up` at every single-node failpoint,
// failpointRuns times each at a different hit, under 32 writers (and a
// forgetter for the forget points), and checks after each restart that
// nothing acknowledged is lost or stored twice, versions are contiguous,
// the shard files are intact, forgotten entities stay forgotten, and the
// stream holds every stored event exactly once.
func TestFailpoints(t *testing.T) {
	seed := faultSeed(t, "KUMA_TEST_SEED")
	t.Logf("seed %d (KUMA_TEST_SEED=%[1]d repeats the hits)", seed)
	rng := rand.New(rand.NewPCG(seed, 0x6b756d61))
	var all fpFigures
	for _, p := range fpSingleNodePoints() {
		hits := make([]int, failpointRuns)
		for i := range hits {
			hits[i] = 1 + rng.IntN(p.maxHit)
		}
		t.Run(p.name, func(t *testing.T) {
			var sum fpFigures
			for _, n := range hits {
				sum.add(fpRunSingle(t, p, n, false))
			}
			t.Logf("%s: hits %v; %s", p.name, hits, sum.String())
			fpAssertClean(t, &sum)
			all.add(sum)
		})
	}
	t.Logf("all single-node points: %s", all.String())

	// Negative control: the same crash with retries that drop their
	// idempotency key. An append committed but never answered is stored
	// again by its retry, and the checker must say so.
	t.Run("negative-control/commit-after-without-keys", func(t *testing.T) {
		n := 1 + rng.IntN(50)
		f := fpRunSingle(t, fpPoint{name: "commit-after", maxHit: 50}, n, true)
		t.Logf("without idempotency keys on retries, commit-after@%d: %s", n, f.String())
		if f.Duplicated == 0 {
			t.Fatalf("retries without their idempotency key after a crash between COMMIT and the reply stored no duplicate, or the checker missed it: %s", f.String())
		}
		if f.Lost != 0 || f.unpublished != 0 || f.streamDup != 0 {
			t.Fatalf("the negative control lost or mispublished events: %s", f.String())
		}
	})
}

// fpAssertClean fails the test on any loss, duplicate, unpublished event or
// other problem.
func fpAssertClean(t *testing.T, f *fpFigures) {
	t.Helper()
	if !f.ok() || f.unpublished != 0 || f.streamDup != 0 || len(f.problems) > 0 {
		f.problems = append(f.problems, f.Samples...)
		sort.Strings(f.problems)
		if len(f.problems) > 20 {
			f.problems = append(f.problems[:20], fmt.Sprintf("... and %d more", len(f.problems)-20))
		}
		t.Fatalf("%s\n%s", f.String(), strings.Join(f.problems, "\n"))
	}
}

// TestFailpointCheckersSeeFailures: the checkers above report what they
// are there to report, on real data bent on purpose: a shard file with
// damaged pages, an acknowledged append missing, an event stored twice,
// and a stream that lacks one event and repeats another.
func TestFailpointCheckersSeeFailures(t *testing.T) {
	events := []kuma.RecordedEvent{
		{Version: 1, Data: json.RawMessage(`{"i":0}`)},
		{Version: 2, Data: json.RawMessage(`{"i":1}`)},
		{Version: 3, Data: json.RawMessage(`{"i":1}`)}, // a retry stored again
	}
	var f fpFigures
	checkEvents(&f.loadFindings, "e", 1, 3, events, true) // 3 acknowledged: i=2 is missing
	if f.Lost != 1 || f.Duplicated != 1 || f.Gaps != 0 {
		t.Fatalf("entity checker: lost %d, duplicated %d, out of sequence %d; want 1, 1 and 0", f.Lost, f.Duplicated, f.Gaps)
	}
	f = fpFigures{}
	checkEvents(&f.loadFindings, "e", 1, 2, []kuma.RecordedEvent{events[0], {Version: 3, Data: json.RawMessage(`{"i":1}`)}}, true)
	if f.Gaps == 0 {
		t.Fatal("entity checker: a version gap went unreported")
	}
	f = fpFigures{}
	checkEvents(&f.loadFindings, "e", 1, 1, events[:2], true) // one acknowledged, two stored
	if f.Unacked != 1 || f.ok() {
		t.Fatalf("entity checker: unacknowledged %d, ok %v; want 1 and not ok", f.Unacked, f.ok())
	}
	f = fpFigures{}
	checkEvents(&f.loadFindings, "e", 2, 2, events[1:2], false) // from version 2: i=1 acknowledged and there
	if !f.ok() {
		t.Fatalf("entity checker: a sound history from version 2 reported %s", f.String())
	}

	f = fpFigures{}
	stored := map[string][]kuma.RecordedEvent{"e": events[:2]}
	fpCheckStream(stored, map[string][]kuma.StreamEvent{"e": {{Version: 2}, {Version: 2}, {Version: 7}}}, &f)
	if f.unpublished != 1 || f.streamDup != 1 || len(f.problems) != 1 {
		t.Fatalf("stream checker: unpublished %d, twice %d, problems %v; want 1, 1 and the stray version 7", f.unpublished, f.streamDup, f.problems)
	}

	// A real shard file, written and closed by a real node, checks ok;
	// the same file with damaged b-tree pages does not.
	dir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	cmd, logs := startUp(t, dir, port)
	env := map[string]string{"KUMA_NATS_URL": "nats://127.0.0.1:" + strconv.Itoa(port)}
	for i := range 20 {
		if _, errs, code := runCLI(t, env, "append", "fp-check-"+strconv.Itoa(i), "Tick", `{"i":0}`); code != 0 {
			t.Fatalf("append: %s", errs)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("kuma up after SIGTERM: %v\n%s", err, logs)
	}
	f = fpFigures{}
	if n := fpIntegrity(t.Context(), dir, true, &f); n == 0 || len(f.problems) > 0 {
		t.Fatalf("intact files: %d ok, problems %v", n, f.problems)
	}
	var shard string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && shard == "" && strings.HasPrefix(d.Name(), "shard-") && strings.HasSuffix(p, ".db") {
			shard = p
		}
		return nil
	})
	b, err := os.ReadFile(shard)
	if err != nil {
		t.Fatal(err)
	}
	const page = 4096
	if len(b) < 3*page {
		t.Fatalf("%s is %d bytes, want at least 3 pages", shard, len(b))
	}
	for off := page; off+16 <= len(b); off += page {
		copy(b[off+1:off+16], []byte("damaged-by-test")) // past the page type: a b-tree header that lies
	}
	bad := filepath.Join(t.TempDir(), "damaged.db")
	if err := os.WriteFile(bad, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := fpIntegrityOf(t.Context(), bad); err == nil {
		t.Fatalf("integrity_check passed %s with every page header damaged", bad)
	} else {
		t.Logf("damaged copy of %s: %v", filepath.Base(shard), err)
	}
}

// TestParseFailpoint: KUMA_TEST_FAILPOINT is name or name@N, N from 1;
// anything else is refused with what to write.
func TestParseFailpoint(t *testing.T) {
	for _, tc := range []struct {
		in   string
		name string
		nth  int64
		ok   bool
	}{
		{"commit-after", "commit-after", 1, true},
		{"commit-after@1", "commit-after", 1, true},
		{"relay-before-publish@250", "relay-before-publish", 250, true},
		{"commit-after@0", "", 0, false},
		{"commit-after@-3", "", 0, false},
		{"commit-after@x", "", 0, false},
		{"commit-after@", "", 0, false},
		{"@4", "", 0, false},
	} {
		name, nth, err := parseFailpoint(tc.in)
		if (err == nil) != tc.ok || name != tc.name || nth != tc.nth {
			t.Errorf("parseFailpoint(%q) = %q, %d, %v; want %q, %d, ok %v", tc.in, name, nth, err, tc.name, tc.nth, tc.ok)
		}
	}
}
