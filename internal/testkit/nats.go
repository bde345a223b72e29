package testkit

import (
	"testing"

	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// NATS starts a bare embedded NATS server (JetStream on, random loopback
// port, store in t.TempDir()) and a connection to it, for tests that wire
// services by hand. Both stop when the test ends.
func NATS(t testing.TB) (*server.Server, *nats.Conn) {
	t.Helper()
	srv, err := natsbus.StartServer(t.Context(), natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return srv, nc
}
