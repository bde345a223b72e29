//go:build faults

package main

// The long fault suite (-tags faults): the counts the crash and failpoint
// tests run with. faults_off_test.go holds the short default-suite ones.
const (
	crashCycles   = 50 // kill -9 and restart cycles under load
	failpointRuns = 20 // runs of each failpoint
)
