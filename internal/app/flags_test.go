package app

import (
	"flag"
	"testing"

	"github.com/kumadb/kuma/internal/configtest"
	"github.com/kumadb/kuma/services/console"
	"github.com/kumadb/kuma/services/shardnode"
)

// TestFlagDefaultsAreConfigDefaults keeps kuma up's and kuma serve's flags
// in step with setDefaults, so that a Config built in Go gets what the help
// says. Skipped: --target, which kuma serve requires while Go callers get
// all; --node, worked out from the host name at start; and the composed
// components' flags, which their own packages check against their own
// setDefaults.
func TestFlagDefaultsAreConfigDefaults(t *testing.T) {
	components := flag.NewFlagSet("components", flag.ContinueOnError)
	new(shardnode.Config).RegisterFlags(components)
	new(console.Config).RegisterFlags(components)
	skip := []string{"target", "node"}
	components.VisitAll(func(f *flag.Flag) { skip = append(skip, f.Name) })
	for name, register := range map[string]func(*Config, *flag.FlagSet){
		"up":    (*Config).RegisterUpFlags,
		"serve": (*Config).RegisterServeFlags,
	} {
		t.Run(name, func(t *testing.T) {
			configtest.FlagDefaults(t, register, (*Config).setDefaults, skip...)
		})
	}
}
