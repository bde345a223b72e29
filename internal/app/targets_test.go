package app_test

import (
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
)

// TestServicesRunAloneAgainstExternalNATS runs the router and the shardnode
// as separate processes would (`kuma serve --target ...`): each its own App
// with its own connection to an external NATS server.
func TestServicesRunAloneAgainstExternalNATS(t *testing.T) {
	ctx := t.Context()
	srv, nc := kumatest.NATS(t)
	data := filepath.Join(t.TempDir(), "data")
	masterKey := envelope.NewRandomKey()
	// A shardnode alone refuses nothing at start, but a keyvault alone must
	// be given its master key.
	if a, _ := app.New(app.Config{Target: app.ModuleKeyvault, NATSURL: srv.ClientURL(), DataDir: data}); a.Start(ctx) == nil {
		t.Fatal("a keyvault started without a master key")
	}
	for _, target := range []string{app.ModuleKeyvault, app.ModuleShardnode, app.ModuleProjector, app.ModuleRouter, app.ModuleRouter} {
		a, err := app.New(app.Config{Target: target, NATSURL: srv.ClientURL(), DataDir: data, Shards: 4, MasterKey: masterKey, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Start(ctx); err != nil {
			t.Fatalf("start %s: %v", target, err)
		}
		t.Cleanup(func() { _ = a.Stop(t.Context()) })
		if target == app.ModuleRouter && a.Shardnode() != nil {
			t.Fatalf("target router runs a shardnode")
		}
	}
	c, _ := client.New(nc, client.Options{})
	ar, err := c.Append(ctx, "split-1", []kuma.EventInput{{Type: "Created", Data: []byte(`{"n":1}`)}})
	if err != nil {
		t.Fatal(err)
	}
	// The projector, alone too, opens the event through the keyvault.
	q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: ar.Position})
	if err != nil || len(q.Rows) != 1 || q.Rows[0]["entity"] != "split-1" {
		t.Fatalf("query entities after %s = %+v, %v; want the entity", ar.Position, q, err)
	}
	r, err := c.Read(ctx, "split-1")
	if err != nil || r.Version != 1 {
		t.Fatalf("read = %+v, %v", r, err)
	}
	if _, err := app.New(app.Config{Target: "projectorz"}); err == nil {
		t.Fatal("an unknown target was accepted")
	}
}

// TestNonLoopbackListenNeedsInsecure: the embedded NATS server, having no
// authentication, listens beyond loopback only when told --insecure.
func TestNonLoopbackListenNeedsInsecure(t *testing.T) {
	for _, tc := range []struct {
		listen   string
		insecure bool
		ok       bool
	}{
		{"127.0.0.1:4222", false, true},
		{"localhost:4222", false, true},
		{"[::1]:4222", false, true},
		{"0.0.0.0:4222", false, false},
		{":4222", false, false},
		{"10.1.2.3:4222", false, false},
		{"0.0.0.0:4222", true, true},
	} {
		_, err := app.New(app.Config{DataDir: t.TempDir(), NATS: natsbus.ServerConfig{Listen: tc.listen}, Insecure: tc.insecure})
		if (err == nil) != tc.ok {
			t.Errorf("listen %s insecure %v: %v; want ok %v", tc.listen, tc.insecure, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "--insecure") {
			t.Errorf("listen %s: %v does not say how to allow it", tc.listen, err)
		}
	}
	// A service alone runs no server, so its --nats-listen does not matter.
	if _, err := app.New(app.Config{Target: app.ModuleRouter, DataDir: t.TempDir(), NATS: natsbus.ServerConfig{Listen: "0.0.0.0:4222"}}); err != nil {
		t.Errorf("router alone: %v", err)
	}
}
