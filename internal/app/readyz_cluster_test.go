package app_test

import (
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
)

// TestReadyzOfShardnodesSharingShards: two shardnodes share the shards of one
// context, so neither ever opens all of them. Each must still turn ready
// once it serves the shards placed on it (Kubernetes' readiness probes, and
// a StatefulSet's ordered start, depend on it), and say which it lacks
// until then.
func TestReadyzOfShardnodesSharingShards(t *testing.T) {
	srv, _ := kumatest.NATS(t)
	var bases []string
	for _, node := range []string{"sn1", "sn2"} {
		a, err := app.New(app.Config{Target: app.ModuleShardnode, NATSURL: srv.ClientURL(), NodeName: node,
			DataDir: filepath.Join(t.TempDir(), node), Shards: 8, MetricsListen: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = a.Stop(t.Context()) })
		bases = append(bases, "http://"+a.MetricsAddr())
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, base := range bases {
		for {
			code, body := get(t, base+"/readyz")
			if code == http.StatusOK {
				break
			}
			if !strings.Contains(body, "shard") {
				t.Fatalf("/readyz = %d %q does not say which shards are missing", code, body)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s/readyz = %d %q 30 s after two shardnodes started, want %d", base, code, body, http.StatusOK)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}
