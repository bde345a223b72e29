package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime/debug"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

// defaultMemoryLimitRatio leaves a tenth of a container's memory to what Go's
// heap does not hold: SQLite's page caches, goroutine stacks, the binary.
const defaultMemoryLimitRatio = 0.9

// memoryLimitRefresh is how often the container's limit is read again, so
// that a pod resized in place gets a matching limit.
const memoryLimitRefresh = time.Minute

// applyMemoryLimit sets Go's soft memory limit (GOMEMLIMIT) to ratio of the
// memory limit that limit reports (the process's cgroup's, in production)
// and follows it while ctx lives.
//
// Why: without it, Go lets its heap grow to twice what is live before it
// collects (GOGC 100), and does not know the container's limit. After the seed
// workload a node held 320 MB live in a heap grown to 950 MB (BENCHMARKS.md),
// so a container sized for the live memory is killed by the kernel while Go
// could have collected. With the limit, the collector works harder as the
// heap nears it instead. It is a soft limit: it changes when the collector
// runs, never what Kuma keeps.
//
// A GOMEMLIMIT in the environment wins (the runtime already applied it and
// the library leaves it alone), as does AUTOMEMLIMIT, which it reads too; no limit at all (a process
// outside any container) changes nothing, and neither does a platform without
// cgroups.
func applyMemoryLimit(ctx context.Context, ratio float64, limit memlimit.Provider, log *slog.Logger) error {
	if math.IsNaN(ratio) || ratio < 0 || ratio > 1 {
		return usageError{fmt.Errorf("--memory-limit-ratio must be between 0 (off) and 1, got %v", ratio)}
	}
	if ratio == 0 {
		return nil
	}
	before := debug.SetMemoryLimit(-1)
	set, err := memlimit.Set(
		memlimit.WithRatio(ratio),
		memlimit.WithProvider(limit),
		memlimit.WithRefreshInterval(ctx, memoryLimitRefresh),
	)
	switch {
	case errors.Is(err, memlimit.ErrCgroupsNotSupported):
		return nil
	case err != nil:
		// No cgroup file to read is not a reason to refuse to start: Kuma
		// runs as it would without the limit.
		log.Warn("the container's memory limit could not be read; Go's memory limit stays as it was", "err", err)
		return nil
	case set != before && set != math.MaxInt64:
		log.Info("Go's memory limit follows the container's", "limit_mib", set>>20, "ratio", ratio)
	}
	return nil
}
