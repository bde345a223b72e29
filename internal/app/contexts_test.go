package app_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestTwoContextsShareOneNATS: a deployment of context "alpha" (kuma up)
// and one of context "beta" (a shardnode and a router of its own, against
// alpha's NATS and keyvault) share one NATS. Every request of each context
// is answered by that context's deployment: no router takes a request of a
// context it does not serve (they shared kuma.*.<op>.* in one queue group,
// so about half of them answered not_found).
func TestTwoContextsShareOneNATS(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	alpha := kumatest.Start(t, func(c *app.Config) { c.Context = "alpha" })
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	data := t.TempDir()
	for _, target := range []string{app.ModuleShardnode, app.ModuleRouter} {
		a, err := app.New(app.Config{Target: target, NATSURL: alpha.App.ClientURL(), DataDir: data, NodeName: "beta-1",
			Context: "beta", Shards: 4, Logger: quiet})
		if err != nil {
			t.Fatalf("app.New %s: %v", target, err)
		}
		if err := a.Start(ctx); err != nil {
			t.Fatalf("start %s of beta: %v", target, err)
		}
		t.Cleanup(func() {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = a.Stop(sctx)
		})
	}
	beta := alpha.Client(client.Options{Context: "beta"})
	waitStatus(t, beta, "beta's shards owned", func(st *kuma.StatusReply) bool {
		for _, sh := range st.Shards {
			if sh.Owner == "" {
				return false
			}
		}
		return len(st.Shards) == 4
	})
	const n = 40
	for i := range n {
		for _, kctx := range []string{"alpha", "beta"} {
			id := fmt.Sprintf("%s-%d", kctx, i)
			var a kuma.AppendReply
			wantOK(t, request(t, alpha.NC, "kuma."+kctx+".append."+id,
				`{"events":[{"type":"Created","data":{"ctx":"`+kctx+`"}}]}`), &a)
			if a.Entity != id || a.LastVersion != 1 {
				t.Fatalf("append %s in %s = %+v", id, kctx, a)
			}
		}
	}
	for i := range n {
		for _, kctx := range []string{"alpha", "beta"} {
			id := fmt.Sprintf("%s-%d", kctx, i)
			var r kuma.ReadReply
			wantOK(t, request(t, alpha.NC, "kuma."+kctx+".read."+id, ""), &r)
			if r.Version != 1 || string(r.State) != `{"ctx":"`+kctx+`"}` {
				t.Fatalf("read %s in %s = version %d state %s", id, kctx, r.Version, r.State)
			}
		}
	}
	// A context nobody serves is not answered by either router.
	if _, err := alpha.NC.Request("kuma.gamma.read.x-1", nil, 200*time.Millisecond); err == nil {
		t.Fatal("a request of a context nobody serves was answered")
	}
}
