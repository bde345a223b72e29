// Package configtest checks a component's Config against its flags. It
// imports nothing of Kuma, so that a service's own tests (in the service's
// package, where setDefaults is visible) can use it.
package configtest

import (
	"flag"
	"slices"
	"testing"
)

// FlagDefaults fails t for every flag that register defines whose default
// is not what setDefaults fills into a zero C, so that the flags' help and
// a Config built in Go never disagree. skip names flags whose default is
// worked out elsewhere on purpose (a host name at start, a value a command
// requires); every other flag, including one added later, is checked.
func FlagDefaults[C any](t testing.TB, register func(*C, *flag.FlagSet), setDefaults func(*C), skip ...string) {
	t.Helper()
	var defaults C
	setDefaults(&defaults)
	var probe C
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	register(&probe, fs)
	// The flags point into probe: with setDefaults' values copied in, each
	// flag's value is what a Config built in Go gets.
	probe = defaults
	checked := 0
	fs.VisitAll(func(f *flag.Flag) {
		if slices.Contains(skip, f.Name) {
			return
		}
		checked++
		if got := f.Value.String(); got != f.DefValue {
			t.Errorf("--%s: setDefaults gives %q, the flag's default is %q", f.Name, got, f.DefValue)
		}
	})
	if checked == 0 {
		t.Error("no flag was checked: register defined none, or all are skipped")
	}
}
