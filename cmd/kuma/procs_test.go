package main

import (
	"errors"
	"io"
	"log/slog"
	"runtime"
	"testing"
)

// A node runs two Go processors per CPU unless told otherwise: the flag's
// 1 and a GOMAXPROCS in the environment leave Go's default, and a value out
// of range is a usage error that changes nothing.
func TestApplyProcs(t *testing.T) {
	runtime.SetDefaultGOMAXPROCS()
	def := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.SetDefaultGOMAXPROCS() })
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	if err := applyProcs(t.Context(), 2, false, log); err != nil {
		t.Fatal(err)
	}
	if got := runtime.GOMAXPROCS(0); got != 2*def {
		t.Fatalf("--procs-per-cpu 2 on %d CPUs: GOMAXPROCS %d, want %d", def, got, 2*def)
	}
	runtime.SetDefaultGOMAXPROCS()
	for _, tc := range []struct {
		name   string
		perCPU int
		envSet bool
	}{
		{"GOMAXPROCS in the environment", 2, true},
		{"one per CPU", 1, false},
	} {
		if err := applyProcs(t.Context(), tc.perCPU, tc.envSet, log); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := runtime.GOMAXPROCS(0); got != def {
			t.Fatalf("%s: GOMAXPROCS %d, want Go's default %d", tc.name, got, def)
		}
	}
	for _, bad := range []int{0, -1, 17} {
		err := applyProcs(t.Context(), bad, false, log)
		var ue usageError
		if !errors.As(err, &ue) {
			t.Fatalf("--procs-per-cpu %d: %v, want a usage error", bad, err)
		}
		if got := runtime.GOMAXPROCS(0); got != def {
			t.Fatalf("--procs-per-cpu %d changed GOMAXPROCS to %d", bad, got)
		}
	}
}
