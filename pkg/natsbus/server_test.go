package natsbus_test

import (
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/natsbus"
)

func TestServerConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  natsbus.ServerConfig
		want []string
	}{
		{"listen without port", natsbus.ServerConfig{Listen: "127.0.0.1"}, []string{"listen address", "want host:port"}},
		{"cluster listen without port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "0.0.0.0"}, []string{"cluster listen address", "want host:port"}},
		{"cluster port 0", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:0"}, []string{"cluster listen address", "-1 for a free one"}},
		{"cluster port too big", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:70000"}, []string{"bad port"}},
		{"route not nats", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"http://10.0.0.1:6222"}}, []string{"want scheme nats://"}},
		{"route bare host", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"10.0.0.1:6222"}}, []string{"route \"10.0.0.1:6222\""}},
		{"route without port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://10.0.0.1"}}, []string{"no port", "nats://10.0.0.1:6222"}},
		{"route without host", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://:6222"}}, []string{"no host"}},
		{"route with path", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://10.0.0.1:6222/x"}}, []string{"only nats://host:port"}},
		{"routes without cluster listener", natsbus.ServerConfig{ServerName: "n", Routes: []string{"nats://10.0.0.1:6222"}}, []string{"set ClusterListen"}},
		{"advertise without cluster listener", natsbus.ServerConfig{ServerName: "n", ClusterAdvertise: "10.0.0.1:6222"}, []string{"needs a cluster listener"}},
		{"advertise without port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", ClusterAdvertise: "10.0.0.1"}, []string{"cluster advertise address"}},
		{"advertise free port", natsbus.ServerConfig{ServerName: "n", ClusterListen: "127.0.0.1:-1", ClusterAdvertise: "10.0.0.1:-1"}, []string{"cluster advertise address"}},
		{"cluster member without name", natsbus.ServerConfig{ClusterListen: "127.0.0.1:-1"}, []string{"needs a ServerName unique in the cluster"}},
		{"server name with space", natsbus.ServerConfig{ServerName: "node 1"}, []string{"server name \"node 1\""}},
		{"server name with wildcard", natsbus.ServerConfig{ServerName: "node*"}, []string{"server name"}},
		{"cluster name too long", natsbus.ServerConfig{ClusterName: strings.Repeat("c", 65)}, []string{"cluster name"}},
		{"every problem at once", natsbus.ServerConfig{ServerName: "a b", ClusterListen: "x", Routes: []string{"tls://h:1"}}, []string{"server name", "cluster listen address", "want scheme nats://"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if err == nil {
				t.Fatal("Validate: got nil, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate: got %q, want it to contain %q", err, w)
				}
			}
			// StartServer refuses it too, before listening on anything.
			cfg := tc.cfg
			cfg.StoreDir = t.TempDir()
			if srv, err := natsbus.StartServer(t.Context(), cfg); err == nil {
				srv.Shutdown()
				t.Fatal("StartServer: got nil error")
			}
		})
	}
	for _, ok := range []natsbus.ServerConfig{
		{},
		{ServerName: "node-1.example.com", ClusterName: "kuma_eu", ClusterListen: "0.0.0.0:6222", Routes: []string{"nats://10.0.0.1:6222", "nats://[::1]:6222", "nats://peer.example.com:6222"}},
		{ServerName: "n", ClusterListen: "[::]:-1"},
		{ServerName: "n", ClusterListen: "0.0.0.0:6222", ClusterAdvertise: "kuma1.example.com:16222"},
	} {
		if err := ok.Validate(); err != nil {
			t.Errorf("Validate(%+v): got %v, want nil", ok, err)
		}
	}
}
