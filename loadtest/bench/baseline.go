package bench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// The baselines: the same workload written straight to SQLite files, with no
// NATS, actors, JSON, sealing or relay, on the same disk, shard count and
// synchronous setting.
const (
	// BaselineSQLite is raw SQLite written the plain way: a group-commit
	// writer per file, one INSERT per row. Issue 6's reference.
	BaselineSQLite = "sqlite"
	// BaselineSQLiteMultiRow is the same with multi-row INSERTs: the
	// physical limit of these cores and this disk.
	BaselineSQLiteMultiRow = "sqlite-multirow"
	// BaselineShardWriter is Kuma's own shard writer (pkg/sqlite) driven
	// directly: what everything above the storage layer costs.
	BaselineShardWriter = "shard-writer"
)

var baselines = []string{BaselineSQLite, BaselineSQLiteMultiRow, BaselineShardWriter, BaselinePostgres}

// parseBaselines splits --baseline's comma-separated list, refusing unknown
// names before any run starts.
func parseBaselines(s string) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	var out []string
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		known := false
		for _, b := range baselines {
			known = known || name == b
		}
		if !known {
			return nil, fmt.Errorf("unknown baseline %q (want %s)", name, strings.Join(baselines, ", "))
		}
		out = append(out, name)
	}
	return out, nil
}

// baselineCommit writes one entity's batch durably to shard.
type baselineCommit func(ctx context.Context, shard int, entity string, versions []int64, payload []byte, at time.Time) error

// openBaseline opens the files of one baseline in dir.
func openBaseline(ctx context.Context, name, dir string, c config) (baselineCommit, func(), error) {
	var closers []func() error
	closeAll := func() {
		for _, f := range closers {
			_ = f()
		}
	}
	path := func(i int) string { return filepath.Join(dir, fmt.Sprintf("shard-%03d.db", i)) }
	switch name {
	case BaselinePostgres:
		pg, err := openPostgres(ctx, c)
		if err != nil {
			return nil, nil, err
		}
		return pg.commit, pg.close, nil
	case BaselineShardWriter:
		shards := make([]*sqlite.Shard, c.shards)
		for i := range shards {
			s, err := sqlite.Open(ctx, sqlite.Config{Path: path(i), Context: "baseline", Shard: i, Shards: c.shards,
				Synchronous: c.sync, Logger: discardLog})
			if err != nil {
				closeAll()
				return nil, nil, err
			}
			closers = append(closers, s.Close)
			shards[i] = s
		}
		return func(ctx context.Context, shard int, entity string, versions []int64, payload []byte, at time.Time) error {
			com := &sqlite.Commit{Entity: entity, CreatedAt: at, Events: make([]sqlite.EventRow, len(versions))}
			for i, v := range versions {
				com.Events[i] = sqlite.EventRow{Version: v, Payload: payload, Time: at}
			}
			return shards[shard].Commit(ctx, com)
		}, closeAll, nil
	default:
		writers := make([]*rawWriter, c.shards)
		for i := range writers {
			w, err := openRawWriter(ctx, path(i), c.sync, name == BaselineSQLiteMultiRow)
			if err != nil {
				closeAll()
				return nil, nil, err
			}
			closers = append(closers, w.close)
			writers[i] = w
		}
		return func(ctx context.Context, shard int, entity string, versions []int64, payload []byte, at time.Time) error {
			return writers[shard].commit(ctx, &rawCommit{entity: entity, versions: versions, payload: payload, at: at.UnixNano()})
		}, closeAll, nil
	}
}

// runBaseline runs the workload's appends (not its reads) on one baseline.
func runBaseline(ctx context.Context, name string, c config, out io.Writer) (*result, error) {
	dir, err := os.MkdirTemp("", "kuma-baseline-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	commit, closeAll, err := openBaseline(ctx, name, dir, c)
	if err != nil {
		return nil, fmt.Errorf("baseline %s: %w", name, err)
	}
	defer closeAll()
	data := []byte(payload(c.payloadBytes))
	appends := int64(c.events / c.batch)
	versions := make([]int64, c.entities)
	locks := make([]sync.Mutex, c.entities) // one writer per entity, as Kuma's actors
	var next, failed atomic.Int64
	lats := make([][]time.Duration, c.writers)
	if name == BaselinePostgres {
		fmt.Fprintf(out, "baseline %s: the same appends, one COPY each, pool of %d connections\n", name, c.pgPool)
	} else {
		fmt.Fprintf(out, "baseline %s: the same appends on %d SQLite files (no NATS, no actors, no sealing)\n", name, c.shards)
	}
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < c.writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			batch := make([]int64, c.batch)
			for next.Add(1) <= appends {
				e := rng.IntN(c.entities)
				id := fmt.Sprintf("user-%d", e)
				t0 := time.Now()
				locks[e].Lock()
				for i := range batch {
					batch[i] = versions[e] + int64(i) + 1
				}
				err := commit(ctx, placement.ShardOf(id, c.shards), id, batch, data, t0)
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
	r := &result{Target: "baseline " + name, Appends: int64(len(all)), Events: int64(len(all)) * int64(c.batch),
		Errors: failed.Load(), Elapsed: elapsed, Append: percentilesOf(all)}
	r.EventsSec = float64(r.Events) / elapsed.Seconds()
	fmt.Fprintf(out, "baseline %s throughput: %.0f events/s, append latency: %s\n", name, r.EventsSec, r.Append)
	if r.Errors > 0 {
		return r, fmt.Errorf("baseline %s: %d commits failed", name, r.Errors)
	}
	return r, nil
}
