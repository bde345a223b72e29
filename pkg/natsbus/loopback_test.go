package natsbus_test

import (
	"testing"

	"github.com/kumadb/kuma/pkg/natsbus"
)

func TestLoopbackListen(t *testing.T) {
	for listen, want := range map[string]bool{
		"127.0.0.1:9480": true, "localhost:9480": true, "LOCALHOST:1": true, "[::1]:9480": true, "127.0.0.2:1": true,
		":9480": false, "0.0.0.0:9480": false, "[::]:1": false, "10.0.0.5:9480": false, "kuma.example:9480": false,
		"nonsense": false, "127.0.0.1": false,
	} {
		if got := natsbus.LoopbackListen(listen); got != want {
			t.Errorf("LoopbackListen(%q) = %v, want %v", listen, got, want)
		}
	}
}
