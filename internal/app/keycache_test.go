package app_test

import (
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestProjectorSharesTheShardnodesKeys: in one process the projector uses
// the shardnode's cache of data keys, so that an entity's key is held once
// (at the default bound, 100,000 keys of about 1.3 KB each in every cache)
// and the projector opens a new entity's events without asking the
// keyvault: its cache misses stay at 0 while it applies appends to entities
// it has never seen. Before, it kept a cache of its own and missed once per
// entity. Each service still counts its own hits and misses.
func TestProjectorSharesTheShardnodesKeys(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	var positions []string
	for _, id := range []string{"share-a", "share-b", "share-c"} {
		r, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Noted", Data: []byte(`{"n":1}`)}})
		if err != nil {
			t.Fatal(err)
		}
		positions = append(positions, r.Position)
	}
	var rows []map[string]any
	for _, p := range positions { // each a read-your-writes wait on its shard
		rows = entityRows(t, c, "share-", p)
	}
	if len(rows) != 3 {
		t.Fatalf("the entities read model holds %d of the 3 entities", len(rows))
	}
	metric := func(name string) float64 {
		mfs, err := n.App.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetCounter().GetValue()
			}
		}
		t.Fatalf("no %s metric", name)
		return 0
	}
	if m := metric("kuma_projector_key_cache_misses_total"); m != 0 {
		t.Errorf("the projector asked the keyvault %v times for keys the shardnode had just used", m)
	}
	if h := metric("kuma_projector_key_cache_hits_total"); h < 3 {
		t.Errorf("the projector's key cache hits: %v, want at least 3 (one per entity)", h)
	}
	if m := metric("kuma_key_cache_misses_total"); m < 3 {
		t.Errorf("the shardnode's key cache misses: %v, want at least 3 (one new key per entity)", m)
	}
}
