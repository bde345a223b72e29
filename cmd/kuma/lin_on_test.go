//go:build faults

package main

import "time"

// The faults suite's linearizability runs: five runs of three kills each,
// with longer phases, so that more operations are in flight across more
// crashes. lin_off_test.go is the short default version.
const (
	linRuns       = 5
	linKills      = 3
	linPhase      = 5 * time.Second
	linCheckLimit = 5 * time.Minute
)
