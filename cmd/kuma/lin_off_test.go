//go:build !faults

package main

import "time"

// The default suite's linearizability run: one run, two kills, short
// phases, so that it stays well under 30 seconds. lin_on_test.go is the
// long version behind the faults tag.
const (
	linRuns  = 1
	linKills = 2
	// linPhase is how long clients run between kills (each kill comes at a
	// random moment within the phase's second half).
	linPhase = 2500 * time.Millisecond
	// linCheckLimit bounds porcupine's search; Unknown fails the test.
	linCheckLimit = 60 * time.Second
)
