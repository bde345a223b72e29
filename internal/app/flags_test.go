package app

import (
	"flag"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/configtest"
	"github.com/kumadb/kuma/pkg/natsbus"
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

// TestNATSServerConfigIsHandedOverWhole: the embedded server gets NATS as
// configured (a new setting of natsbus.ServerConfig reaches it with no
// copying here), with what the process decides filled in: its store under
// the data dir, and a name only as a cluster member (NodeName), a
// standalone server keeping nats-server's "kuma" and no cluster name.
func TestNATSServerConfigIsHandedOverWhole(t *testing.T) {
	for _, tc := range []struct {
		name              string
		nats              natsbus.ServerConfig
		server, clusterOf string
	}{
		{"standalone", natsbus.ServerConfig{Listen: "127.0.0.1:4333", MaxPayload: 1 << 20, ReadyTimeout: time.Minute, ServerName: "ignored"}, "", ""},
		{"cluster member", natsbus.ServerConfig{Listen: "127.0.0.1:4333", MaxPayload: 1 << 20, ReadyTimeout: time.Minute, ServerName: "ignored",
			ClusterListen: "127.0.0.1:6222", Routes: []string{"nats://127.0.0.1:6223"}, ClusterAdvertise: "10.0.0.1:6222"}, "n1", DefaultClusterName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{DataDir: "/data", NodeName: "n1", NATS: tc.nats}
			c.setDefaults()
			want := tc.nats
			want.StoreDir = filepath.Join("/data", "nats")
			want.Logger = c.Logger
			want.ServerName = tc.server
			want.ClusterName = tc.clusterOf
			if got := c.natsServerConfig(); !reflect.DeepEqual(got, want) {
				t.Fatalf("got %+v, want %+v", got, want)
			}
		})
	}
}
