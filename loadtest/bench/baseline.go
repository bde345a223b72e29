package bench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// runSQLiteBaseline runs the same workload straight on Kuma's shard writer:
// the same number of SQLite files, group commit, synchronous setting and
// payload size, with no NATS, actors, JSON validation, sealing or relay.
// It is the physical limit the full path is measured against.
func runSQLiteBaseline(ctx context.Context, c config, out io.Writer) (*result, error) {
	dir, err := os.MkdirTemp("", "kuma-baseline-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	shards := make([]*sqlite.Shard, c.shards)
	for i := range shards {
		s, err := sqlite.Open(ctx, sqlite.Config{Path: filepath.Join(dir, fmt.Sprintf("shard-%03d.db", i)),
			Context: "baseline", Shard: i, Shards: c.shards, Synchronous: c.sync, Logger: discardLog})
		if err != nil {
			return nil, err
		}
		defer s.Close()
		shards[i] = s
	}
	data := []byte(payload(c.payloadBytes))
	appends := int64(c.events / c.batch)
	versions := make([]int64, c.entities)
	locks := make([]sync.Mutex, c.entities) // one writer per entity, as Kuma's actors
	var next, failed atomic.Int64
	lats := make([][]time.Duration, c.writers)
	fmt.Fprintf(out, "baseline: the same workload on %d raw SQLite shard writers (no NATS, no actors, no sealing)\n", c.shards)
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < c.writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			for next.Add(1) <= appends {
				e := rng.IntN(c.entities)
				id := fmt.Sprintf("user-%d", e)
				t0 := time.Now()
				locks[e].Lock()
				com := &sqlite.Commit{Entity: id, CreatedAt: t0}
				for i := 0; i < c.batch; i++ {
					com.Events = append(com.Events, sqlite.EventRow{Version: versions[e] + int64(i) + 1, Payload: data, Time: t0})
				}
				err := shards[placement.ShardOf(id, c.shards)].Commit(ctx, com)
				if err == nil {
					versions[e] += int64(c.batch)
				}
				locks[e].Unlock()
				if err != nil {
					failed.Add(1)
					continue
				}
				lats[w] = append(lats[w], time.Since(t0))
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	r := &result{Target: "sqlite baseline", Appends: int64(len(all)), Events: int64(len(all)) * int64(c.batch),
		Errors: failed.Load(), Elapsed: elapsed, Append: percentilesOf(all)}
	r.EventsSec = float64(r.Events) / elapsed.Seconds()
	fmt.Fprintf(out, "baseline throughput: %.0f events/s, append latency: %s\n", r.EventsSec, r.Append)
	if r.Errors > 0 {
		return r, fmt.Errorf("baseline: %d commits failed", r.Errors)
	}
	return r, nil
}
