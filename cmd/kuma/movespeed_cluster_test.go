//go:build cluster

package main

import (
	"context"
	"encoding/json"
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
)

// TestShardMoveSpeed measures what issue 8 asks: how long a shard of
// 100,000 events takes to move, and the append latency clients see
// meanwhile on the moving shard and on the others. It asserts only
// correctness (no failed request, nothing lost); the figures are printed.
func TestShardMoveSpeed(t *testing.T) {
	const events = 100_000
	c := newCluster(t, "local")
	c.add("n1", "n2")
	nc := connect(t, c.urls())
	settle(t, nc, []string{"n1", "n2"}, 60*time.Second)
	cl, err := client.New(nc, client.Options{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	const shard = 5
	onShard := func(prefix string, n int) []string {
		var out []string
		for i := 0; len(out) < n; i++ {
			e := prefix + strconv.Itoa(i)
			if placement.ShardOf(e, clusterShards) == shard {
				out = append(out, e)
			}
		}
		return out
	}
	// Fill the shard: 1,000 appends of 100 events over 100 entities.
	fill := onShard("bulk-", 100)
	batch := make([]kuma.EventInput, 100)
	for i := range batch {
		batch[i] = kuma.EventInput{Type: "Filled", Data: json.RawMessage(`{"pad":"` + strings.Repeat("x", 150) + `"}`)}
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(fill))
	for _, e := range fill {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < events/100/len(fill); i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := cl.Append(ctx, e, batch, client.IdempotencyKey(e+"-"+strconv.Itoa(i)))
				cancel()
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// 40 writers on the moving shard, 40 on the others, timed separately.
	type timed struct {
		mu  sync.Mutex
		lat []time.Duration
	}
	var moving, still timed
	var stop, window atomic.Bool
	var failed atomic.Int64
	writer := func(entity string, into *timed) {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err := cl.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(`{}`)}}, client.IdempotencyKey(entity+"-"+strconv.Itoa(i)))
			cancel()
			if err != nil {
				failed.Add(1)
				t.Errorf("append %s: %v", entity, err)
				return
			}
			if window.Load() {
				into.mu.Lock()
				into.lat = append(into.lat, time.Since(start))
				into.mu.Unlock()
			}
		}
	}
	for _, e := range onShard("mover-", 40) {
		wg.Add(1)
		go writer(e, &moving)
	}
	for i := 0; i < 40; i++ {
		e := "still-" + strconv.Itoa(i)
		if placement.ShardOf(e, clusterShards) == shard {
			continue
		}
		wg.Add(1)
		go writer(e, &still)
	}
	time.Sleep(time.Second)
	from := leases(t, nc)[shard].Owner
	to := map[string]string{"n1": "n2", "n2": "n1"}[from]
	window.Store(true)
	start := time.Now()
	out, errOut, code := runCLI(t, map[string]string{"KUMA_NATS_URL": c.urls()}, "migrate", "--shard", strconv.Itoa(shard), "--to", to, "--wait", "120s")
	took := time.Since(start)
	time.Sleep(500 * time.Millisecond)
	window.Store(false)
	stop.Store(true)
	wg.Wait()
	if code != 0 {
		t.Fatalf("migrate: exit %d\n%s%s", code, out, errOut)
	}
	p99 := func(tm *timed) (time.Duration, int) {
		s := append([]time.Duration(nil), tm.lat...)
		if len(s) == 0 {
			return 0, 0
		}
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return s[len(s)*99/100], len(s)
	}
	mp, mn := p99(&moving)
	sp, sn := p99(&still)
	var handoff, takeover string
	for _, line := range strings.Split(c.node(from).p.logs.String(), "\n") {
		if strings.Contains(line, "shard handed off") && strings.Contains(line, "shard="+strconv.Itoa(shard)+" ") {
			handoff = line[strings.Index(line, "events="):]
		}
	}
	for _, line := range strings.Split(c.node(to).p.logs.String(), "\n") {
		if strings.Contains(line, "shard taken") && strings.Contains(line, "shard="+strconv.Itoa(shard)+" ") {
			takeover = line[strings.Index(line, "epoch="):]
		}
	}
	t.Logf("move of shard %d (%d+ events) from %s to %s: kuma migrate returned after %s (%s); hand-off: %s; take-over: %s",
		shard, events, from, to, took.Round(time.Millisecond), strings.TrimSpace(errOut), handoff, takeover)
	t.Logf("append latency during the move: moving shard p99 %s (%d appends), other shards p99 %s (%d appends); failed %d",
		mp.Round(time.Millisecond), mn, sp.Round(time.Millisecond), sn, failed.Load())
}
