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
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/kumatest"
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

// fpFigures are one run's (or the sum of a point's runs') counts.
type fpFigures struct {
	runs        int
	acked       int64 // appends acknowledged to the writers
	stored      int64 // events read back
	lost        int64 // acknowledged appends whose event is missing
	duplicated  int64 // events whose append is stored more than once
	unpublished int64 // stored events missing from the stream
	streamDup   int64 // stored events the stream holds more than once
	forgotten   int   // entities forgotten and answering entity_forgotten
	files       int   // .db files that passed integrity_check (crash state and end)
	problems    []string
}

func (f *fpFigures) add(o fpFigures) {
	f.runs += o.runs
	f.acked += o.acked
	f.stored += o.stored
	f.lost += o.lost
	f.duplicated += o.duplicated
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
	return fmt.Sprintf("runs %d, appends acknowledged %d, events stored %d, lost %d, duplicated %d, unpublished %d, twice in the stream %d, forgotten %d, SQLite files integrity-checked %d",
		f.runs, f.acked, f.stored, f.lost, f.duplicated, f.unpublished, f.streamDup, f.forgotten, f.files)
}

// fpLoad is the writers (and, for the forget points, a forgetter). Each
// writer appends to its own entity one event at a time, event i carrying
// {"i":i} under the idempotency key entity-i, and retries an append that
// failed with the same key until it is acknowledged, across restarts.
// With dropKeyOnRetry (the negative control) retries carry no key. A
// writer waits pace between two appends (0: none).
type fpLoad struct {
	c              *client.Client
	dropKeyOnRetry bool
	pace           time.Duration
	stop           atomic.Bool
	wg             sync.WaitGroup
	acks           atomic.Int64
	retries        atomic.Int64

	mu        sync.Mutex
	acked     map[string]int64 // entity → appends acknowledged (the next append's i)
	forgotten map[string]bool  // victims whose forget was acknowledged
	failed    []string         // writers or forgets that gave up
}

func fpStartLoad(t *testing.T, nc *nats.Conn, writers int, dropKeyOnRetry bool, pace time.Duration) *fpLoad {
	t.Helper()
	c, err := client.New(nc, client.Options{NoAutoIdempotencyKey: dropKeyOnRetry})
	if err != nil {
		t.Fatal(err)
	}
	l := &fpLoad{c: c, dropKeyOnRetry: dropKeyOnRetry, pace: pace, acked: map[string]int64{}, forgotten: map[string]bool{}}
	for w := range writers {
		entity := fmt.Sprintf("fp-w-%02d", w)
		l.acked[entity] = 0
		l.wg.Add(1)
		go l.writer(entity)
	}
	return l
}

func (l *fpLoad) writer(entity string) {
	defer l.wg.Done()
	for i := 0; !l.stop.Load(); i++ {
		key := entity + "-" + strconv.Itoa(i)
		events := []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(`{"i":` + strconv.Itoa(i) + `}`)}}
		giveUp := time.Now().Add(fpGiveUp)
		for attempt := 0; ; attempt++ {
			var opts []client.AppendOption
			if attempt == 0 || !l.dropKeyOnRetry {
				opts = append(opts, client.IdempotencyKey(key))
			}
			ctx, cancel := context.WithTimeout(context.Background(), fpAttempt)
			_, err := l.c.Append(ctx, entity, events, opts...)
			cancel()
			if err == nil {
				l.mu.Lock()
				l.acked[entity] = int64(i + 1)
				l.mu.Unlock()
				l.acks.Add(1)
				time.Sleep(l.pace)
				break
			}
			l.retries.Add(1)
			if time.Now().After(giveUp) {
				l.mu.Lock()
				l.failed = append(l.failed, fmt.Sprintf("%s: append %d not acknowledged within %s: %v", entity, i, fpGiveUp, err))
				l.mu.Unlock()
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// fpMakeVictims gives each victim two events, for the forgetter to erase.
func fpMakeVictims(t *testing.T, c *client.Client, n int) []string {
	t.Helper()
	var out []string
	for v := range n {
		id := fmt.Sprintf("fp-victim-%02d", v)
		for i := range 2 {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := c.Append(ctx, id, []kuma.EventInput{{Type: "Joined", Data: json.RawMessage(`{"i":` + strconv.Itoa(i) + `}`)}},
				client.IdempotencyKey(id+"-"+strconv.Itoa(i)))
			cancel()
			if err != nil {
				t.Fatalf("make victim %s: %v", id, err)
			}
		}
		out = append(out, id)
	}
	return out
}

// forgetter forgets the victims one after the other, each retried until
// acknowledged (a forget is idempotent).
func (l *fpLoad) forgetter(victims []string) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for _, v := range victims {
			giveUp := time.Now().Add(fpGiveUp)
			for {
				ctx, cancel := context.WithTimeout(context.Background(), fpAttempt)
				_, err := l.c.Forget(ctx, v, "failpoint test", "fp")
				cancel()
				if err == nil {
					l.mu.Lock()
					l.forgotten[v] = true
					l.mu.Unlock()
					break
				}
				if time.Now().After(giveUp) {
					l.mu.Lock()
					l.failed = append(l.failed, fmt.Sprintf("forget %s not acknowledged within %s: %v", v, fpGiveUp, err))
					l.mu.Unlock()
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
			time.Sleep(30 * time.Millisecond)
		}
	}()
}

func (l *fpLoad) waitAcks(t *testing.T, n int64, limit time.Duration) {
	t.Helper()
	target := l.acks.Load() + n
	for deadline := time.Now().Add(limit); l.acks.Load() < target; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("writers stalled: %d appends acknowledged, waiting for %d", l.acks.Load(), target)
		}
	}
}

// finish stops the writers after the append each has in hand is
// acknowledged, and waits for them and the forgetter.
func (l *fpLoad) finish(t *testing.T) {
	t.Helper()
	l.stop.Store(true)
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(fpGiveUp + 30*time.Second):
		t.Fatal("writers did not finish their pending appends")
	}
	if len(l.failed) > 0 {
		t.Fatalf("gave up:\n%s", strings.Join(l.failed, "\n"))
	}
}

// fpCheckEntity checks one writer's entity: versions 1..n contiguous, event
// v carrying i = v-1, every acknowledged append (i < acked) present once.
// It returns how many acknowledged appends are missing and how many stored
// events repeat an append already stored.
func fpCheckEntity(entity string, acked int64, events []kuma.RecordedEvent, f *fpFigures) {
	seen := map[int64]int{}
	for k, e := range events {
		var d struct{ I *int64 }
		if err := json.Unmarshal(e.Data, &d); err != nil || d.I == nil {
			f.problem("%s version %d: data %s is not {\"i\":N}", entity, e.Version, e.Data)
			continue
		}
		if e.Version != int64(k+1) {
			f.problem("%s: event %d has version %d: versions not contiguous", entity, k, e.Version)
		}
		if seen[*d.I] > 0 {
			f.duplicated++
		} else if *d.I != e.Version-1 {
			f.problem("%s: version %d carries i=%d, want %d", entity, e.Version, *d.I, e.Version-1)
		}
		seen[*d.I]++
	}
	for i := int64(0); i < acked; i++ {
		if seen[i] == 0 {
			f.lost++
		}
	}
	if extra := int64(len(seen)) - acked; extra > 0 {
		// The writers finished every append they started, so nothing
		// stored can be unacknowledged.
		f.problem("%s: %d appends stored beyond the %d acknowledged", entity, extra, acked)
	}
	f.acked += acked
	f.stored += int64(len(events))
}

// fpHistory reads an entity's whole history.
func fpHistory(c *client.Client, entity string) ([]kuma.RecordedEvent, error) {
	var out []kuma.RecordedEvent
	for from := int64(1); ; {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		h, err := c.History(ctx, entity, from, 1000)
		cancel()
		if err != nil {
			return nil, err
		}
		out = append(out, h.Events...)
		if h.NextVersion == nil {
			return out, nil
		}
		from = *h.NextVersion
	}
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
func fpVerify(t *testing.T, nc *nats.Conn, l *fpLoad, victims []string, f *fpFigures) {
	t.Helper()
	stored := map[string][]kuma.RecordedEvent{}
	for entity, acked := range l.acked {
		events, err := fpHistory(l.c, entity)
		if err != nil {
			t.Fatalf("history of %s: %v", entity, err)
		}
		stored[entity] = events
		fpCheckEntity(entity, acked, events, f)
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
// (the shard files and the keyvault's; the NATS store's index.db files are
// not SQLite) and returns how many passed; each failure is a problem, and
// so is finding no shard file when wantShards.
func fpIntegrity(ctx context.Context, dir string, wantShards bool, f *fpFigures) int {
	var paths []string
	shards := 0
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
		case d.IsDir() && d.Name() == "nats":
			return filepath.SkipDir
		case !d.IsDir() && strings.HasSuffix(p, ".db"):
			paths = append(paths, p)
			if strings.HasPrefix(d.Name(), "shard-") {
				shards++
			}
		}
		return nil
	})
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
func fpWaitKilled(t *testing.T, cmd *exec.Cmd, logs *logBuffer, point string, n int, l *fpLoad) time.Duration {
	t.Helper()
	start := time.Now()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	select {
	case <-exited:
	case <-time.After(fpHitWithin):
		t.Fatalf("%s@%d not reached within %s (%d appends acknowledged)\n%s", point, n, fpHitWithin, l.acks.Load(), fpTail(logs.String()))
	}
	<-logs.closed
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("kuma ended with %v, want killed by SIGKILL at %s@%d\n%s", cmd.ProcessState, point, n, fpTail(logs.String()))
	}
	if want := fmt.Sprintf("kuma: failpoint %s reached (hit %d)", point, n); !strings.Contains(logs.String(), want) {
		t.Fatalf("killed, but not at the failpoint: no %q in its stderr\n%s", want, fpTail(logs.String()))
	}
	return time.Since(start)
}

// fpRunSingle is one run of a single-node point: kill at point@n under
// load, restart, finish, check.
func fpRunSingle(t *testing.T, p fpPoint, n int, dropKeyOnRetry bool) fpFigures {
	f := fpFigures{runs: 1}
	dir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	cmd, logs := startUp(t, dir, port, "KUMA_TEST_FAILPOINT="+p.name+"@"+strconv.Itoa(n))
	nc, err := nats.Connect("nats://127.0.0.1:"+strconv.Itoa(port), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	l := fpStartLoad(t, nc, fpWriterCount, dropKeyOnRetry, 0)
	var victims []string
	if p.forget {
		victims = fpMakeVictims(t, l.c, fpVictimCount)
		l.forgetter(victims)
	}
	hit := fpWaitKilled(t, cmd, logs, p.name, n, l)
	ackedAtKill := l.acks.Load()
	f.files += fpIntegrity(t.Context(), dir, true, &f) // the files as the crash left them

	restart := time.Now()
	cmd, logs = startUp(t, dir, port)
	l.waitAcks(t, 2*fpWriterCount, 60*time.Second)
	back := time.Since(restart)
	l.finish(t)
	fpVerify(t, nc, l, victims, &f)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("kuma up after SIGTERM: %v\n%s", err, fpTail(logs.String()))
	}
	f.files += fpIntegrity(t.Context(), dir, true, &f)
	t.Logf("%s@%d: hit after %s with %d appends acknowledged; writers going again %s after the restart; %s; retried attempts %d",
		p.name, n, hit.Round(time.Millisecond), ackedAtKill, back.Round(time.Millisecond), f.String(), l.retries.Load())
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
		if f.duplicated == 0 {
			t.Fatalf("retries without their idempotency key after a crash between COMMIT and the reply stored no duplicate, or the checker missed it: %s", f.String())
		}
		if f.lost != 0 || f.unpublished != 0 || f.streamDup != 0 {
			t.Fatalf("the negative control lost or mispublished events: %s", f.String())
		}
	})
}

// fpAssertClean fails the test on any loss, duplicate, unpublished event or
// other problem.
func fpAssertClean(t *testing.T, f *fpFigures) {
	t.Helper()
	if f.lost != 0 || f.duplicated != 0 || f.unpublished != 0 || f.streamDup != 0 || len(f.problems) > 0 {
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
	fpCheckEntity("e", 3, events, &f) // 3 acknowledged: i=2 is missing
	if f.lost != 1 || f.duplicated != 1 {
		t.Fatalf("entity checker: lost %d, duplicated %d; want 1 and 1", f.lost, f.duplicated)
	}
	f = fpFigures{}
	fpCheckEntity("e", 2, []kuma.RecordedEvent{events[0], {Version: 3, Data: json.RawMessage(`{"i":1}`)}}, &f)
	if len(f.problems) == 0 {
		t.Fatal("entity checker: a version gap went unreported")
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

// fpTail is the last lines of a process's log, for failure messages.
func fpTail(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
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
