package main

// The writer load shared by the cluster tests (-tags cluster) and the crash
// tests: many writers, each appending to its own entity one event at a
// time, and a checker that reads every entity back.

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
	errs     map[string]int
	samples  []string        // the first few errors, with when and where
	lat      []time.Duration // per acknowledged append, first try to ack
}

func startLoad(t *testing.T, nc *nats.Conn, cfg loadConfig) *load {
	if cfg.attempt <= 0 {
		cfg.attempt = 20 * time.Second
	}
	c, err := client.New(nc, client.Options{Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	l := &load{c: c, cfg: cfg, acked: map[string]int64{}, ackedN: map[string]int64{}, errs: map[string]int{}}
	l.base, l.cancel = context.WithCancel(context.Background())
	t.Cleanup(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.cancel()
	})
	for w := range cfg.writers {
		l.wg.Add(1)
		go l.writer(fmt.Sprintf("w-%03d", w))
	}
	return l
}

func (l *load) writer(entity string) {
	defer l.wg.Done()
	for i := 0; !l.stop.Load(); i++ {
		start := time.Now()
		for {
			l.mu.Lock()
			base := l.base
			l.mu.Unlock()
			ctx, cancel := context.WithTimeout(base, l.cfg.attempt)
			l.attempts.Add(1)
			rep, err := l.c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(`{"i":` + strconv.Itoa(i) + `}`)}},
				client.IdempotencyKey(entity+"-"+strconv.Itoa(i)))
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
			l.mu.Unlock()
			if l.stop.Load() {
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

func (l *load) finish() {
	l.stop.Store(true)
	l.wg.Wait()
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
	Codes      map[kuma.Code]int // the error codes they were refused with
	Samples    []string
}

func (f *loadFindings) ok() bool {
	return f.Lost == 0 && f.Duplicated == 0 && f.Gaps == 0 && f.Unreadable == 0
}

func (f *loadFindings) String() string {
	s := fmt.Sprintf("%d entities, %d events read: lost %d, duplicated %d, gaps %d, unreadable %d",
		f.Entities, f.Events, f.Lost, f.Duplicated, f.Gaps, f.Unreadable)
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

// checkEntity reads entity's history from version from (1: all of it) up to
// version upTo (0: to the end) and adds to f what is wrong with it, given
// that its first acked appends were acknowledged: every version contiguous
// from from, version v carrying append i = v-1, each append once, and every
// acknowledged append at or after from present. It returns the last version
// read.
func (l *load) checkEntity(ctx context.Context, f *loadFindings, entity string, from, acked, upTo int64) int64 {
	var events []kuma.RecordedEvent
	for next := from; ; {
		limit := int64(1000)
		if upTo > 0 {
			limit = min(limit, max(1, upTo-next+1))
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		h, err := l.c.History(cctx, entity, next, int(limit))
		cancel()
		if err != nil {
			f.Unreadable++
			f.code(kuma.ErrorCode(err), 1)
			f.note("%s: history from %d: %v", entity, next, err)
			return from - 1
		}
		events = append(events, h.Events...)
		if h.NextVersion == nil || (upTo > 0 && *h.NextVersion > upTo) {
			break
		}
		next = *h.NextVersion
	}
	f.Entities++
	f.Events += len(events)
	seen := map[int64]int{}
	last := from - 1
	for k, e := range events {
		var d struct{ I *int64 }
		if err := json.Unmarshal(e.Data, &d); err != nil || d.I == nil {
			f.Gaps++
			f.note("%s: version %d carries %s, not an append index", entity, e.Version, e.Data)
			continue
		}
		seen[*d.I]++
		if seen[*d.I] == 2 {
			f.Duplicated++
			f.note("%s: append %d stored again at version %d", entity, *d.I, e.Version)
		}
		if want := from + int64(k); e.Version != want || *d.I != e.Version-1 {
			f.Gaps++
			f.note("%s: event %d from version %d is version %d carrying i=%d", entity, k, from, e.Version, *d.I)
		}
		last = e.Version
	}
	for i := from - 1; i < acked; i++ {
		if seen[i] == 0 {
			f.Lost++
			if f.Lost <= 3 {
				f.note("%s: acknowledged append %d (of %d) missing", entity, i, acked)
			}
		}
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
