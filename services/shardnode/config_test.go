package shardnode

import (
	"testing"

	"github.com/kumadb/kuma/internal/configtest"
)

// TestFlagDefaultsAreConfigDefaults keeps RegisterFlags and setDefaults in
// step: kuma up's help shows the defaults a Config built in Go gets.
func TestFlagDefaultsAreConfigDefaults(t *testing.T) {
	configtest.FlagDefaults(t, (*Config).RegisterFlags, (*Config).setDefaults)
}
