package main

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"time"
)

// defaultProcsPerCPU is how many Go processors (GOMAXPROCS) a node runs for
// each CPU Go would use by default.
const defaultProcsPerCPU = 2

// procsRefresh is how often the CPUs are counted again, so that a container
// resized in place keeps the ratio (the runtime stops following its CPU limit
// once GOMAXPROCS is set).
const procsRefresh = time.Minute

// applyProcs runs Go with perCPU processors for each CPU (the count Go takes
// by default: the machine's, or the container's CPU limit) and keeps it so
// while ctx lives. A GOMAXPROCS in the environment wins; perCPU 1 leaves
// Go's default.
//
// Why: much of a node's work waits in system calls that block (the fsync of
// every group commit in each shard's writer, JetStream's fsync of every
// stream message, the keyvault's), and a processor whose thread is in one
// runs no Go code until the runtime's monitor takes it back. With one
// processor per CPU, a node under the seed workload used 1.2 to 1.3 of two
// cores while tens of goroutines waited to run; with two per CPU it used
// 1.5 and did about 40 % more events per second (BENCHMARKS.md).
func applyProcs(ctx context.Context, perCPU int, envSet bool, log *slog.Logger) error {
	if perCPU < 1 || perCPU > 16 {
		return usageError{fmt.Errorf("--procs-per-cpu must be 1 to 16, got %d", perCPU)}
	}
	if perCPU == 1 || envSet {
		return nil
	}
	n := setProcs(perCPU)
	log.Info("Go runs more processors than CPUs, as the node waits on fsync", "gomaxprocs", n, "per_cpu", perCPU)
	go func() {
		t := time.NewTicker(procsRefresh)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				setProcs(perCPU)
			}
		}
	}()
	return nil
}

// setProcs sets GOMAXPROCS to perCPU times the runtime's default and
// returns it.
func setProcs(perCPU int) int {
	runtime.SetDefaultGOMAXPROCS()
	n := runtime.GOMAXPROCS(0) * perCPU
	runtime.GOMAXPROCS(n)
	return n
}
