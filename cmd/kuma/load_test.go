package main

// The fault suite's one harness for load and verification, shared by the
// crash, failpoint, forget, stop and cluster tests: many writers, each
// appending to its own entity one event at a time (and, if asked, a
// forgetter), and one checker of what an entity's history must hold.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go"
)

// loadConfig sizes a load.
type loadConfig struct {
	writers int
	shards  int // the context's shard count, to name an entity's shard in error samples
	// attempt bounds one append attempt (default 20s). Requests in flight
	// when a server dies get no reply, so a crash test wants it short:
	// the writer then retries with the same key instead of waiting.
	attempt time.Duration
	// prefix names the writers' entities prefix-000, prefix-001... (default
	// "w").
	prefix string
	// pace is a writer's wait after each acknowledged append (0: none).
	pace time.Duration
	// giveUp bounds how long one append may stay unacknowledged; the
	// writer then stops and finishWithin fails the test. 0: retry for ever.
	giveUp time.Duration
	// dropKeyOnRetry is the failpoint suite's negative control: retries
	// carry no idempotency key, so an append committed but never answered
	// is stored again, which the checker must report.
	dropKeyOnRetry bool
}

// load is a set of writers, each appending to its own entity one event at a
// time with an idempotency key per event, retrying a failed append with the
// same key until it is acknowledged (across server restarts too). Event i
// of a writer carries {"i":i}, so version v of its entity must hold i =
// v-1: a lost or duplicated event shows.
type load struct {
	c        *client.Client
	cfg      loadConfig
	stop     atomic.Bool
	wg       sync.WaitGroup
	attempts atomic.Int64 // append requests sent, retries included
	acks     atomic.Int64
	dups     atomic.Int64 // acknowledgements the server answered from its idempotency record
	failures atomic.Int64 // appends that returned an error (then retried)
	mu       sync.Mutex
	base     context.Context // parent of every attempt; interrupt cancels it
	cancel   context.CancelFunc
	acked    map[string]int64 // entity → highest acknowledged version
	ackedN   map[string]int64 // entity → appends acknowledged (the next one's i)
	// forgotten holds the victims whose forget was acknowledged.
	forgotten map[string]bool
	// gaveUp lists the appends and forgets not acknowledged within giveUp.
	gaveUp  []string
	errs    map[string]int
	samples []string        // the first few errors, with when and where
	lat     []time.Duration // per acknowledged append, first try to ack
}

func startLoad(t *testing.T, nc *nats.Conn, cfg loadConfig) *load {
	if cfg.attempt <= 0 {
		cfg.attempt = 20 * time.Second
	}
	if cfg.prefix == "" {
		cfg.prefix = "w"
	}
	c, err := client.New(nc, client.Options{Timeout: 15 * time.Second, NoAutoIdempotencyKey: cfg.dropKeyOnRetry})
	if err != nil {
		t.Fatal(err)
	}
	l := &load{c: c, cfg: cfg, acked: map[string]int64{}, ackedN: map[string]int64{}, forgotten: map[string]bool{}, errs: map[string]int{}}
	l.base, l.cancel = context.WithCancel(context.Background())
	t.Cleanup(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.cancel()
	})
	for w := range cfg.writers {
		entity := fmt.Sprintf("%s-%03d", cfg.prefix, w)
		l.ackedN[entity] = 0 // checked even if nothing of it is acknowledged
		l.wg.Add(1)
		go l.writer(entity)
	}
	return l
}

func (l *load) writer(entity string) {
	defer l.wg.Done()
	for i := 0; !l.stop.Load(); i++ {
		start := time.Now()
		for attempt := 0; ; attempt++ {
			l.mu.Lock()
			base := l.base
			l.mu.Unlock()
			var opts []client.AppendOption
			if attempt == 0 || !l.cfg.dropKeyOnRetry {
				opts = append(opts, client.IdempotencyKey(entity+"-"+strconv.Itoa(i)))
			}
			ctx, cancel := context.WithTimeout(base, l.cfg.attempt)
			l.attempts.Add(1)
			rep, err := l.c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(`{"i":` + strconv.Itoa(i) + `}`)}}, opts...)
			cancel()
			if err == nil {
				l.acks.Add(1)
				if rep.Duplicate {
					l.dups.Add(1)
				}
				l.mu.Lock()
				l.acked[entity] = max(l.acked[entity], rep.LastVersion)
				l.ackedN[entity] = int64(i + 1)
				l.lat = append(l.lat, time.Since(start))
				l.mu.Unlock()
				time.Sleep(l.cfg.pace)
				break
			}
			l.failures.Add(1)
			code := string(kuma.ErrorCode(err))
			if errors.Is(err, context.Canceled) {
				code = "interrupted"
			}
			l.mu.Lock()
			l.errs[code]++
			if len(l.samples) < 5 {
				l.samples = append(l.samples, fmt.Sprintf("%s %s (shard %d) after %s: %v", time.Now().Format("15:04:05.000"), entity,
					placement.ShardOf(entity, l.cfg.shards), time.Since(start).Round(time.Millisecond), err))
			}
			if l.cfg.giveUp > 0 && time.Since(start) > l.cfg.giveUp {
				l.gaveUp = append(l.gaveUp, fmt.Sprintf("%s: append %d not acknowledged within %s: %v", entity, i, l.cfg.giveUp, err))
				l.mu.Unlock()
				return
			}
			l.mu.Unlock()
			if l.stop.Load() && l.cfg.giveUp == 0 {
				return // never acknowledged: not counted
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// interrupt ends every append attempt in flight; each is tried again with
// its key. A crash test calls it after a kill: the dead server never
// answers what it had taken, and waiting out the attempts' timeout would
// leave the writers idle through the restart.
func (l *load) interrupt() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cancel()
	l.base, l.cancel = context.WithCancel(context.Background())
}

func (l *load) waitAcks(t *testing.T, n int64, limit time.Duration) {
	t.Helper()
	target := l.acks.Load() + n
	deadline := time.Now().Add(limit)
	for l.acks.Load() < target {
		if time.Now().After(deadline) {
			t.Fatalf("load stalled: %d acknowledged, waiting for %d", l.acks.Load(), target)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// finish stops the writers and waits for them. A load without giveUp
// drops the append each has in hand; one with giveUp finishes it (so every
// append stored was acknowledged): use finishWithin.
func (l *load) finish() {
	l.stop.Store(true)
	l.wg.Wait()
}

// finishWithin stops the writers once the append each has in hand is
// acknowledged, waits for them and the forgetter at most limit, and fails
// the test if any gave up.
func (l *load) finishWithin(t *testing.T, limit time.Duration) {
	t.Helper()
	l.stop.Store(true)
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(limit):
		t.Fatal("writers did not finish their pending appends")
	}
	if len(l.gaveUp) > 0 {
		t.Fatalf("gave up:\n%s", strings.Join(l.gaveUp, "\n"))
	}
}

// makeVictims gives each of n entities two events, for the forgetter to
// erase.
func makeVictims(t *testing.T, c *client.Client, n int) []string {
	t.Helper()
	var out []string
	for v := range n {
		id := fmt.Sprintf("victim-%02d", v)
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

// forgetter forgets the victims one after the other while the writers
// write, each retried until acknowledged (a forget is idempotent) or
// giveUp has passed.
func (l *load) forgetter(victims []string) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for _, v := range victims {
			start := time.Now()
			for {
				ctx, cancel := context.WithTimeout(context.Background(), l.cfg.attempt)
				_, err := l.c.Forget(ctx, v, "fault test", "harness")
				cancel()
				if err == nil {
					l.mu.Lock()
					l.forgotten[v] = true
					l.mu.Unlock()
					break
				}
				if l.cfg.giveUp > 0 && time.Since(start) > l.cfg.giveUp {
					l.mu.Lock()
					l.gaveUp = append(l.gaveUp, fmt.Sprintf("forget %s not acknowledged within %s: %v", v, l.cfg.giveUp, err))
					l.mu.Unlock()
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
			time.Sleep(30 * time.Millisecond)
		}
	}()
}

func (l *load) p99() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lat) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), l.lat...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)*99/100]
}

// ackedSnapshot copies entity → appends acknowledged so far.
func (l *load) ackedSnapshot() map[string]int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]int64, len(l.ackedN))
	for e, n := range l.ackedN {
		out[e] = n
	}
	return out
}

// loadFindings is what a check of the writers' entities found. Lost,
// Duplicated and Gaps count problems; a sound store has none.
type loadFindings struct {
	Entities   int
	Events     int               // events read
	Lost       int               // acknowledged appends missing
	Duplicated int               // appends stored more than once
	Gaps       int               // events whose version is out of sequence or does not match the append they carry
	Unreadable int               // entities whose history could not be read
	Unacked    int               // appends stored beyond those acknowledged, where every append begun was finished
	Codes      map[kuma.Code]int // the error codes they were refused with
	Samples    []string
}

func (f *loadFindings) ok() bool {
	return f.Lost == 0 && f.Duplicated == 0 && f.Gaps == 0 && f.Unreadable == 0 && f.Unacked == 0
}

func (f *loadFindings) String() string {
	s := fmt.Sprintf("%d entities, %d events read: lost %d, duplicated %d, gaps %d, unreadable %d, unacknowledged %d",
		f.Entities, f.Events, f.Lost, f.Duplicated, f.Gaps, f.Unreadable, f.Unacked)
	if len(f.Samples) > 0 {
		s += "\n" + strings.Join(f.Samples, "\n")
	}
	return s
}

// add counts g's findings into f.
func (f *loadFindings) add(g *loadFindings) {
	f.Entities += g.Entities
	f.Events += g.Events
	f.Lost += g.Lost
	f.Duplicated += g.Duplicated
	f.Gaps += g.Gaps
	f.Unreadable += g.Unreadable
	f.Unacked += g.Unacked
	for c, n := range g.Codes {
		f.code(c, n)
	}
	for _, s := range g.Samples {
		f.note("%s", s)
	}
}

func (f *loadFindings) code(c kuma.Code, n int) {
	if f.Codes == nil {
		f.Codes = map[kuma.Code]int{}
	}
	f.Codes[c] += n
}

func (f *loadFindings) note(format string, args ...any) {
	if len(f.Samples) < 10 {
		f.Samples = append(f.Samples, fmt.Sprintf(format, args...))
	}
}

// history reads entity's events from version from (1: all of them) up to
// version upTo (0: to the end), a page at a time.
func history(ctx context.Context, c *client.Client, entity string, from, upTo int64) ([]kuma.RecordedEvent, error) {
	var events []kuma.RecordedEvent
	for next := from; ; {
		limit := int64(1000)
		if upTo > 0 {
			limit = min(limit, max(1, upTo-next+1))
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		h, err := c.History(cctx, entity, next, int(limit))
		cancel()
		if err != nil {
			return nil, fmt.Errorf("history from %d: %w", next, err)
		}
		events = append(events, h.Events...)
		if h.NextVersion == nil || (upTo > 0 && *h.NextVersion > upTo) {
			return events, nil
		}
		next = *h.NextVersion
	}
}

// checkEntity reads entity's history from version from up to upTo (see
// history) and adds to f what checkEvents finds wrong with it. It returns
// the last version read.
func (l *load) checkEntity(ctx context.Context, f *loadFindings, entity string, from, acked, upTo int64) int64 {
	events, err := history(ctx, l.c, entity, from, upTo)
	if err != nil {
		f.Unreadable++
		f.code(kuma.ErrorCode(err), 1)
		f.note("%s: %v", entity, err)
		return from - 1
	}
	return checkEvents(f, entity, from, acked, events, false)
}

// checkEvents adds to f what is wrong with events, an entity's history from
// version from, given that its first acked appends were acknowledged:
// every version contiguous from from, version v carrying append i = v-1,
// each append once, and every acknowledged append at or after from
// present. With finished (every append begun was acknowledged), an append
// stored beyond the acknowledged ones is wrong too. It returns the last
// version in events.
func checkEvents(f *loadFindings, entity string, from, acked int64, events []kuma.RecordedEvent, finished bool) int64 {
	f.Entities++
	f.Events += len(events)
	seen := map[int64]int{}
	last := from - 1
	for k, e := range events {
		last = e.Version
		var d struct{ I *int64 }
		if err := json.Unmarshal(e.Data, &d); err != nil || d.I == nil {
			f.Gaps++
			f.note("%s: version %d carries %s, not an append index", entity, e.Version, e.Data)
			continue
		}
		seen[*d.I]++
		switch {
		case e.Version != from+int64(k):
			f.Gaps++
			f.note("%s: event %d from version %d is version %d: versions not contiguous", entity, k, from, e.Version)
		case seen[*d.I] > 1:
			f.Duplicated++
			f.note("%s: append %d stored again at version %d", entity, *d.I, e.Version)
		case *d.I != e.Version-1:
			f.Gaps++
			f.note("%s: version %d carries i=%d, want %d", entity, e.Version, *d.I, e.Version-1)
		}
	}
	for i := from - 1; i < acked; i++ {
		if seen[i] == 0 {
			f.Lost++
			if f.Lost <= 3 {
				f.note("%s: acknowledged append %d (of %d) missing", entity, i, acked)
			}
		}
	}
	if extra := int64(len(seen)) - (acked - from + 1); finished && extra > 0 {
		f.Unacked += int(extra)
		f.note("%s: %d appends stored beyond the %d acknowledged", entity, extra, acked)
	}
	return last
}

// check reads every writer's entity back in full and returns the findings.
func (l *load) check(ctx context.Context) *loadFindings {
	f := &loadFindings{}
	for entity, n := range l.ackedSnapshot() {
		l.checkEntity(ctx, f, entity, 1, n, 0)
	}
	return f
}

// verify checks every writer's entity (see check) and fails the test on any
// finding. It returns the number of events checked.
func (l *load) verify(t *testing.T) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	f := l.check(ctx)
	if !f.ok() {
		t.Fatalf("acknowledged events lost or duplicated: %s", f)
	}
	return f.Events
}

// connect dials a NATS connection (urls: one or several, comma-separated)
// that reconnects for ever, quickly (opts add to or override that): a
// load's writers live through every restart and failover on it.
func connect(t *testing.T, urls string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(urls, append([]nats.Option{nats.MaxReconnects(-1), nats.ReconnectWait(50 * time.Millisecond), nats.ReconnectJitter(0, 0)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// tail is the last n lines of a process's log, for failure messages.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
