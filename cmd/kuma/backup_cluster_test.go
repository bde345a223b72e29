//go:build cluster

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestBackupOfAClusterRestoresIntoOneNode: kuma backup against three `kuma
// up` nodes, whose shards have owners on every node and whose keyvault is
// the JetStream bucket; restored into one empty data dir, a single node
// serves every event and keeps the forgotten entity forgotten.
func TestBackupOfAClusterRestoresIntoOneNode(t *testing.T) {
	c, nc := startKeyed(t)
	cl, err := client.New(nc, client.Options{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	want := map[string]int{}
	for i := range 64 { // every shard of 16 gets some
		id := fmt.Sprintf("c-%d", i)
		for v := range 3 {
			if _, err := cl.Append(ctx, id, []kuma.EventInput{{Type: "Noted", Data: json.RawMessage(fmt.Sprintf(`{"v":%d}`, v))}}); err != nil {
				t.Fatal(err)
			}
		}
		want[id] = 3
	}
	if _, err := cl.Forget(ctx, "c-0", "test", "test"); err != nil {
		t.Fatal(err)
	}
	delete(want, "c-0")

	dir := filepath.Join(t.TempDir(), "backup")
	if out, errs, code := runCLI(t, map[string]string{"KUMA_NATS_URL": c.urls()}, "backup", dir); code != 0 {
		t.Fatalf("kuma backup of the cluster: exit %d %s%s", code, out, errs)
	}
	data := filepath.Join(t.TempDir(), "restored")
	if out, errs, code := runCLI(t, nil, "restore", "--from", dir, "--data", data, "--master-key-file", c.masterKeyFile); code != 0 {
		t.Fatalf("kuma restore: exit %d %s%s", code, out, errs)
	}
	b, err := os.ReadFile(c.masterKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := app.DecodeMasterKey(string(b[:len(b)-1]))
	if err != nil {
		t.Fatal(err)
	}
	one := kumatest.Start(t, func(cfg *app.Config) { cfg.DataDir, cfg.MasterKey, cfg.Shards = data, key, clusterShards })
	rc := one.Client(client.Options{Timeout: 10 * time.Second})
	for id, n := range want {
		h, err := rc.History(ctx, id, 1, 10)
		if err != nil || len(h.Events) != n {
			t.Fatalf("history of %s after restore: %v, %v; want %d events", id, h, err, n)
		}
		for v, e := range h.Events {
			if got, w := compact(e.Data), fmt.Sprintf(`{"v":%d}`, v); got != w {
				t.Fatalf("%s version %d after restore: %s, want %s", id, v+1, got, w)
			}
		}
	}
	if _, err := rc.Read(ctx, "c-0"); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
		t.Fatalf("read of the forgotten c-0 after restore: %v, want entity_forgotten", err)
	}
}
