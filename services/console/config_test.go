package console

import (
	"testing"

	"github.com/kumadb/kuma/internal/configtest"
)

// TestFlagDefaultsAreConfigDefaults keeps RegisterFlags and setDefaults in
// step.
func TestFlagDefaultsAreConfigDefaults(t *testing.T) {
	configtest.FlagDefaults(t, (*Config).RegisterFlags, (*Config).setDefaults)
}
