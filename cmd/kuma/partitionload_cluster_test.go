//go:build cluster

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
)

// sideAck is one acknowledged append: append i of the writer of entity on
// side, acknowledged at version at time at.
type sideAck struct {
	entity  string
	side    string
	i       int
	version int64
	at      time.Time
}

// splitLoad writes the same entities from both sides of the partition:
// every entity has one writer on each side, appending {"side":S,"i":i}
// with the idempotency key S-entity-i and retrying a failed append with
// the same key. Two acknowledged appends at one version of one entity,
// from two sides or two appends, are two writers.
type splitLoad struct {
	stop  atomic.Bool
	wg    sync.WaitGroup
	phase atomic.Value // "before", "cut" or "healed": when an error happened
	mu    sync.Mutex
	acks  []sideAck
	errs  map[string]int // side/phase/code → count
	notes []string       // the first errors of each side in each phase
}

func startSplitLoad(entities []string, sides map[string]*client.Client) *splitLoad {
	l := &splitLoad{errs: map[string]int{}}
	l.phase.Store("before")
	for side, c := range sides {
		for _, e := range entities {
			l.wg.Add(1)
			go l.writer(c, side, e)
		}
	}
	return l
}

func (l *splitLoad) writer(c *client.Client, side, entity string) {
	defer l.wg.Done()
	for i := 0; !l.stop.Load(); i++ {
		data := json.RawMessage(fmt.Sprintf(`{"side":%q,"i":%d}`, side, i))
		for !l.stop.Load() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			rep, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: data}}, client.IdempotencyKey(side+"-"+entity+"-"+strconv.Itoa(i)))
			cancel()
			if err == nil {
				l.mu.Lock()
				l.acks = append(l.acks, sideAck{entity: entity, side: side, i: i, version: rep.LastVersion, at: time.Now()})
				l.mu.Unlock()
				break
			}
			phase := l.phase.Load().(string)
			key := side + "/" + phase + "/" + string(kuma.ErrorCode(err))
			l.mu.Lock()
			l.errs[key]++
			if l.errs[key] <= 2 && len(l.notes) < 30 {
				l.notes = append(l.notes, fmt.Sprintf("%s %s %s (shard %d): %v", time.Now().Format("15:04:05.000"), side, entity, placement.ShardOf(entity, clusterShards), err))
			}
			l.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (l *splitLoad) finish() {
	l.stop.Store(true)
	l.wg.Wait()
}

// acked copies the acknowledgements so far.
func (l *splitLoad) acked() []sideAck {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]sideAck(nil), l.acks...)
}

func (l *splitLoad) count(side string, after time.Time) int {
	n := 0
	for _, a := range l.acked() {
		if a.side == side && a.at.After(after) {
			n++
		}
	}
	return n
}

// errCodes lists the error codes of side's failures in phase.
func (l *splitLoad) errCodes(side, phase string) map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for k, n := range l.errs {
		if s, rest, _ := strings.Cut(k, "/"); s == side {
			if p, code, _ := strings.Cut(rest, "/"); p == phase {
				out[code] += n
			}
		}
	}
	return out
}

// splitEntities picks per entities on every shard, so that both sides
// write to every shard, the cut node's included.
func splitEntities(per int) []string {
	count := map[int]int{}
	var out []string
	for i := 0; len(out) < per*clusterShards; i++ {
		e := "p-" + strconv.Itoa(i)
		if s := placement.ShardOf(e, clusterShards); count[s] < per {
			count[s]++
			out = append(out, e)
		}
	}
	return out
}

// checkSplitAcks fails on two acknowledgements that cannot both be true:
// two appends at one version of an entity (two writers, one per side of
// the cut, say), or one append at two versions (stored twice).
func checkSplitAcks(t *testing.T, acks []sideAck) {
	t.Helper()
	at := map[string]sideAck{}  // entity@version → the append acknowledged there
	ver := map[string]sideAck{} // entity/side/i → where it was acknowledged
	var bad []string
	for _, a := range acks {
		k := a.entity + "@" + strconv.FormatInt(a.version, 10)
		if b, ok := at[k]; ok && (b.side != a.side || b.i != a.i) {
			bad = append(bad, fmt.Sprintf("%s acknowledged for %s append %d at %s and for %s append %d at %s",
				k, b.side, b.i, b.at.Format("15:04:05.000"), a.side, a.i, a.at.Format("15:04:05.000")))
		}
		at[k] = a
		id := a.entity + "/" + a.side + "/" + strconv.Itoa(a.i)
		if b, ok := ver[id]; ok && b.version != a.version {
			bad = append(bad, fmt.Sprintf("%s append %d of %s acknowledged at versions %d and %d", a.side, a.i, a.entity, b.version, a.version))
		}
		ver[id] = a
	}
	if len(bad) > 0 {
		t.Errorf("%d conflicting acknowledgements (a split brain):\n%s", len(bad), strings.Join(bad[:min(len(bad), 10)], "\n"))
	}
}

// checkSplitHistories reads every entity back through c and fails unless
// every acknowledged append is at its version with its payload, versions
// are contiguous, and no append is stored twice. It returns the events read.
func checkSplitHistories(t *testing.T, acks []sideAck, entities []string, c *client.Client, tc *testCluster) int {
	t.Helper()
	want := map[string]map[int64]sideAck{}
	for _, a := range acks {
		if want[a.entity] == nil {
			want[a.entity] = map[int64]sideAck{}
		}
		want[a.entity][a.version] = a
	}
	total, lost := 0, 0
	var bad []string
	for _, e := range entities {
		var events []kuma.RecordedEvent
		retryUntil := time.Now().Add(30 * time.Second)
		for next := int64(1); ; {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			h, err := c.History(ctx, e, next, 1000)
			cancel()
			// A shard may still move after the heal (its lease lost in the
			// pause the heal causes, taken again): unavailable says retry,
			// as a client does. A timeout is no such answer: a relay stuck
			// behind the read fails the test at once.
			if kuma.ErrorCode(err) == kuma.CodeUnavailable && time.Now().Before(retryUntil) {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			if err != nil {
				t.Fatalf("read %s (shard %d) back from version %d: %v\nthe nodes' last relay failures:\n%s",
					e, placement.ShardOf(e, clusterShards), next, err, relayFailures(tc))
			}
			events = append(events, h.Events...)
			if h.NextVersion == nil {
				break
			}
			next = *h.NextVersion
		}
		total += len(events)
		got := map[int64]string{}
		stored := map[string]int64{}
		for k, ev := range events {
			var d struct {
				Side string
				I    int
			}
			if err := json.Unmarshal(ev.Data, &d); err != nil || d.Side == "" {
				bad = append(bad, fmt.Sprintf("%s version %d carries %s", e, ev.Version, ev.Data))
				continue
			}
			if ev.Version != int64(k+1) {
				bad = append(bad, fmt.Sprintf("%s: event %d is version %d", e, k+1, ev.Version))
			}
			id := d.Side + "/" + strconv.Itoa(d.I)
			if v, ok := stored[id]; ok {
				bad = append(bad, fmt.Sprintf("%s: %s append %d stored at versions %d and %d", e, d.Side, d.I, v, ev.Version))
			}
			stored[id] = ev.Version
			got[ev.Version] = id
		}
		for v, a := range want[e] {
			if id := a.side + "/" + strconv.Itoa(a.i); got[v] != id {
				lost++
				if lost <= 10 {
					bad = append(bad, fmt.Sprintf("%s: %s append %d acknowledged at version %d (%s), which holds %q", e, a.side, a.i, v, a.at.Format("15:04:05.000"), got[v]))
				}
			}
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%d acknowledged appends lost or moved, %d findings:\n%s", lost, len(bad), strings.Join(bad[:min(len(bad), 20)], "\n"))
	}
	return total
}
