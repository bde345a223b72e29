package console

import (
	"math"
	"testing"
	"time"
)

func TestWindowLatency(t *testing.T) {
	bounds := []float64{0.001, 0.002, 0.004, math.Inf(1)}
	t0 := time.Unix(0, 0)
	for _, tc := range []struct {
		name          string
		from, to      []uint64 // cumulative counts per bucket
		p50, p95, p99 float64  // ms
		commits       uint64
	}{
		{"idle", []uint64{5, 5, 5, 5}, []uint64{5, 5, 5, 5}, 0, 0, 0, 0},
		// 100 commits in the window, all in the first bucket: interpolated
		// from 0 to 1 ms.
		{"all fast", []uint64{10, 10, 10, 10}, []uint64{110, 110, 110, 110}, 0.5, 0.95, 0.99, 100},
		// 50 under 1 ms, 50 between 2 and 4 ms.
		{"two groups", []uint64{0, 0, 0, 0}, []uint64{50, 50, 100, 100}, 1, 3.8, 3.96, 100},
		// Past the last finite bound the estimate is that bound.
		{"slow tail", []uint64{0, 0, 0, 0}, []uint64{0, 0, 0, 10}, 4, 4, 4, 10},
	} {
		from := histSnap{t: t0, bounds: bounds, cum: tc.from, count: tc.from[3]}
		to := histSnap{t: t0.Add(10 * time.Second), bounds: bounds, cum: tc.to, count: tc.to[3]}
		got := windowLatency(from, to)
		if got.Commits != tc.commits || got.P50 != tc.p50 || got.P95 != tc.p95 || got.P99 != tc.p99 || got.Window != 10 {
			t.Errorf("%s: got %+v, want p50 %v p95 %v p99 %v over %d commits in 10s", tc.name, *got, tc.p50, tc.p95, tc.p99, tc.commits)
		}
	}
}
