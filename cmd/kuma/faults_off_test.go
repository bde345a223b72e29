//go:build !faults

package main

// The default suite's short counts; -tags faults runs the long ones
// (faults_on_test.go) with the same tests.
const (
	crashCycles   = 3 // kill -9 and restart cycles under load
	failpointRuns = 2 // runs of each failpoint
)
