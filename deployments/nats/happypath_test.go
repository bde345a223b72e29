package natsconf_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go/jetstream"
)

// happyPath uses Kuma as an application (user client), an operator (ops)
// and the console would, over TLS.
func (e *env) happyPath(t *testing.T, console *app.App) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*bound)
	defer cancel()
	nc, _ := e.connect(t, "client")
	c, err := client.New(nc, client.Options{Context: "default", Timeout: bound})
	if err != nil {
		t.Fatal(err)
	}
	ap, err := c.Append(ctx, "user_1", []kuma.EventInput{{Type: "UserCreated",
		Data: json.RawMessage(`{"name":"Dwighson","role":"architect"}`)}}, client.ExpectVersion(0))
	if err != nil {
		t.Fatalf("append as client: %v", err)
	}
	rd, err := c.Read(ctx, "user_1")
	if err != nil || rd.Version != 1 || !strings.Contains(string(rd.State), "Dwighson") {
		t.Fatalf("read as client: %+v, %v", rd, err)
	}
	h, err := c.History(ctx, "user_1", 1, 10)
	if err != nil || len(h.Events) != 1 || h.Events[0].Type != "UserCreated" {
		t.Fatalf("history as client: %+v, %v", h, err)
	}
	q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: ap.Position,
		Params: map[string]json.RawMessage{"where": json.RawMessage(`{"role":"architect"}`)}})
	if err != nil || len(q.Rows) != 1 || q.Rows[0]["entity"] != "user_1" {
		t.Fatalf("query as client (read your write through the projector): %+v, %v", q, err)
	}
	if ex, err := c.Export(ctx, "user_1"); err != nil || len(ex.Events) != 1 {
		t.Fatalf("export as client: %+v, %v", ex, err)
	}
	// A follower reads the feed of its context, opened by the shardnodes,
	// with no right to the keyvault or the stream: a page, and a
	// subscription (the Go client's Subscribe is built on the feed).
	fnc, _ := e.connect(t, "follower")
	fc, err := client.New(fnc, client.Options{Context: "default", Timeout: bound})
	if err != nil {
		t.Fatal(err)
	}
	page, err := fc.Feed(ctx, kuma.FeedRequest{Prefix: "user_1"})
	if err != nil || len(page.Events) != 1 || page.Events[0].Type != "UserCreated" || !strings.Contains(string(page.Events[0].Data), "Dwighson") {
		t.Fatalf("feed as follower: %+v, %v", page, err)
	}
	got := make(chan client.Event, 1)
	sub, err := fc.Subscribe(ctx, client.SubscribeOptions{Entity: "user_1"}, func(ev client.Event) error {
		got <- ev
		return nil
	})
	if err != nil {
		t.Fatalf("subscribe as follower: %v", err)
	}
	select {
	case ev := <-got:
		if ev.Type != "UserCreated" || !strings.Contains(string(ev.Data), "Dwighson") {
			t.Fatalf("follower's subscription got %+v, want the opened UserCreated", ev)
		}
	case <-sub.Done():
		t.Fatalf("the follower's subscription ended: %v", sub.Err())
	case <-ctx.Done():
		t.Fatal("the follower's subscription got no event")
	}
	sub.Stop()
	// forget runs the keyvault's shred, its broadcast and the stream's notice.
	if _, err := c.Append(ctx, "user_2", []kuma.EventInput{{Type: "UserCreated", Data: json.RawMessage(`{"name":"Erased"}`)}}); err != nil {
		t.Fatal(err)
	}
	if fr, err := c.Forget(ctx, "user_2", "test", "natsconf test"); err != nil || fr.EventsDeleted != 1 {
		t.Fatalf("forget as client: %+v, %v", fr, err)
	}
	if _, err := c.Read(ctx, "user_2"); !errors.Is(err, kuma.ErrEntityForgotten) {
		t.Fatalf("read after forget: %v, want entity_forgotten", err)
	}
	// ops reads the status: every shard, and the projector's answer
	// through the shardnode.
	onc, _ := e.connect(t, "ops")
	oc, err := client.New(onc, client.Options{Context: "default", Timeout: bound})
	if err != nil {
		t.Fatal(err)
	}
	st, err := oc.Status(ctx)
	if err != nil || len(st.Shards) != 4 || len(st.Projections) == 0 {
		t.Fatalf("status as ops: %+v, %v", st, err)
	}
	// ops backs up (what kuma backup does): a shard's copy and the
	// keyvault's (exported from its bucket), each downloaded and erased,
	// and the keyvault's tombstones.
	ojs, err := jetstream.New(onc)
	if err != nil {
		t.Fatal(err)
	}
	for i, ask := range []func() (*kuma.BackupReply, error){
		func() (*kuma.BackupReply, error) { return oc.BackupShard(ctx, 0, "natsconf") },
		func() (*kuma.BackupReply, error) { return oc.BackupKeyvault(ctx, "natsconf") },
	} {
		rep, err := ask()
		if err != nil {
			t.Fatalf("backup %d as ops: %v", i, err)
		}
		if err := cluster.GetBackup(ctx, ojs, rep.Object, filepath.Join(t.TempDir(), "copy.db")); err != nil {
			t.Fatalf("download of backup %s as ops: %v", rep.Object, err)
		}
	}
	// What a backup cut short runs: list and erase what is left (nothing).
	if n, err := cluster.EraseBackups(ctx, ojs, "natsconf/"); err != nil || n != 0 {
		t.Fatalf("erase a backup's leftovers as ops: %d, %v", n, err)
	}
	if tb, err := oc.Tombstones(ctx, "", 10); err != nil || len(tb.Tombstones) != 1 {
		t.Fatalf("tombstones as ops: %+v, %v, want user_2's", tb, err)
	}
	// The console (user console) serves an entity.
	res, err := http.Get(console.Console().URL() + "api/entities/user_1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !strings.Contains(string(body), "Dwighson") {
		t.Fatalf("console entity page: %d %s", res.StatusCode, body)
	}
}
