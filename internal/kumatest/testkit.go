package kumatest

import (
	"testing"

	"github.com/kumadb/kuma/internal/testkit"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// LogBuffer is testkit's, here too for the tests that start whole apps.
type LogBuffer = testkit.LogBuffer

// NATS is testkit.NATS: a bare embedded NATS server and a connection to it.
func NATS(t testing.TB) (*server.Server, *nats.Conn) { return testkit.NATS(t) }
