package main

import (
	"bytes"
	"errors"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

// keepMemoryLimit restores the process's memory limit after a test that
// changes it (the other tests of this binary share the process).
func keepMemoryLimit(t *testing.T) int64 {
	t.Helper()
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	return before
}

func TestMemoryLimitFollowsTheContainers(t *testing.T) {
	t.Setenv("GOMEMLIMIT", "")
	t.Setenv("AUTOMEMLIMIT", "")
	os.Unsetenv("GOMEMLIMIT")
	os.Unsetenv("AUTOMEMLIMIT")
	const gib = 1 << 30
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	t.Run("a tenth is left to what Go's heap does not hold", func(t *testing.T) {
		keepMemoryLimit(t)
		container := uint64(2 * gib)
		if err := applyMemoryLimit(t.Context(), 0.9, memlimit.Limit(container), log); err != nil {
			t.Fatal(err)
		}
		if got, want := debug.SetMemoryLimit(-1), int64(float64(container)*0.9); got != want {
			t.Fatalf("memory limit %d, want %d (0.9 of 2 GiB)", got, want)
		}
		if !strings.Contains(logs.String(), "limit_mib=1843") {
			t.Fatalf("the limit is not logged: %s", logs.String())
		}
	})

	t.Run("ratio 0 leaves it off", func(t *testing.T) {
		before := keepMemoryLimit(t)
		if err := applyMemoryLimit(t.Context(), 0, memlimit.Limit(gib), log); err != nil {
			t.Fatal(err)
		}
		if got := debug.SetMemoryLimit(-1); got != before {
			t.Fatalf("memory limit %d after ratio 0, want it unchanged (%d)", got, before)
		}
	})

	t.Run("no container limit changes nothing", func(t *testing.T) {
		keepMemoryLimit(t)
		debug.SetMemoryLimit(math.MaxInt64)
		noLimit := func() (uint64, error) { return 0, memlimit.ErrNoLimit }
		if err := applyMemoryLimit(t.Context(), 0.9, noLimit, log); err != nil {
			t.Fatal(err)
		}
		if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
			t.Fatalf("memory limit %d without a container limit, want none", got)
		}
	})

	t.Run("an unreadable limit is logged, and the node starts anyway", func(t *testing.T) {
		before := keepMemoryLimit(t)
		logs.Reset()
		broken := func() (uint64, error) { return 0, errors.New("permission denied") }
		if err := applyMemoryLimit(t.Context(), 0.9, broken, log); err != nil {
			t.Fatalf("an unreadable cgroup refused the start: %v", err)
		}
		if got := debug.SetMemoryLimit(-1); got != before {
			t.Fatalf("memory limit %d, want it unchanged (%d)", got, before)
		}
		if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "permission denied") {
			t.Fatalf("the failure is not logged: %s", logs.String())
		}
	})

	t.Run("GOMEMLIMIT in the environment wins", func(t *testing.T) {
		before := keepMemoryLimit(t)
		t.Setenv("GOMEMLIMIT", "3GiB")
		if err := applyMemoryLimit(t.Context(), 0.9, memlimit.Limit(gib), log); err != nil {
			t.Fatal(err)
		}
		if got := debug.SetMemoryLimit(-1); got != before {
			t.Fatalf("memory limit %d with GOMEMLIMIT set, want it unchanged (%d)", got, before)
		}
	})
}

func TestMemoryLimitRatioOutOfRangeIsRefused(t *testing.T) {
	for _, ratio := range []string{"1.5", "-0.1", "NaN"} {
		before := keepMemoryLimit(t)
		dir := filepath.Join(t.TempDir(), "data")
		_, stderr, code := runCLI(t, nil, "up", "--data", dir, "--memory-limit-ratio", ratio, "--nats-listen", "127.0.0.1:0")
		if code != 2 || !strings.Contains(stderr, "--memory-limit-ratio must be between 0 (off) and 1") {
			t.Fatalf("--memory-limit-ratio %s: exit %d, stderr %q; want exit 2 and the reason", ratio, code, stderr)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("--memory-limit-ratio %s: the data dir was created (%v): a refused start must change nothing", ratio, err)
		}
		if got := debug.SetMemoryLimit(-1); got != before {
			t.Fatalf("--memory-limit-ratio %s changed the memory limit to %d", ratio, got)
		}
	}
}
