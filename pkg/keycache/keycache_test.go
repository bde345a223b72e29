package keycache

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
)

// countingVault is a Vault over a map that counts DataKey calls, so the
// cache's hits and misses can be seen.
type countingVault struct {
	mu    sync.Mutex
	keys  map[string][]byte
	calls int
}

func (v *countingVault) DataKey(_ context.Context, kctx, entity string, create bool) (vaultclient.KeyReply, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	k, ok := v.keys[kctx+"/"+entity]
	if !ok {
		if !create {
			return vaultclient.KeyReply{}, kuma.ErrNotFound
		}
		k = envelope.NewRandomKey()
		v.keys[kctx+"/"+entity] = k
	}
	return vaultclient.KeyReply{Key: append([]byte(nil), k...), Pseudonym: "P" + entity, Entity: entity}, nil
}

// KeyByPseudonym: the test's pseudonym of x is "Px".
func (v *countingVault) KeyByPseudonym(_ context.Context, kctx, p string) (vaultclient.KeyReply, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	k, ok := v.keys[kctx+"/"+p[1:]]
	if !ok {
		return vaultclient.KeyReply{}, kuma.ErrEntityForgotten
	}
	return vaultclient.KeyReply{Key: append([]byte(nil), k...), Pseudonym: p, Entity: p[1:]}, nil
}

// TestKeyCacheByPseudonym: an entry fetched by id is found by its pseudonym
// and the other way round, and a drop by id drops both names.
func TestKeyCacheByPseudonym(t *testing.T) {
	ctx := t.Context()
	vault := &countingVault{keys: map[string][]byte{}}
	c := New(vault, 10, time.Minute, time.Now, telemetry.Tracer(nil))
	a, err := c.Entry(ctx, "default", "a", true)
	if err != nil || a.Pseudonym != "Pa" || a.Entity != "a" {
		t.Fatalf("entry of a: %+v, %v", a, err)
	}
	byP, err := c.ByPseudonym(ctx, "default", "Pa")
	if err != nil || byP.Key != a.Key || byP.Entity != "a" || vault.count() != 1 {
		t.Fatalf("by pseudonym: %+v, %v, vault calls %d; want the cached entry of a", byP, err, vault.count())
	}
	vault.mu.Lock()
	vault.keys["default/b"] = envelope.NewRandomKey()
	vault.mu.Unlock()
	if b, err := c.ByPseudonym(ctx, "default", "Pb"); err != nil || b.Entity != "b" {
		t.Fatalf("b by pseudonym: %+v, %v", b, err)
	}
	if _, err := c.Get(ctx, "default", "b", false); err != nil || vault.count() != 2 {
		t.Fatalf("b by id after by pseudonym: %v, vault calls %d; want a hit", err, vault.count())
	}
	// Shredded: the drop by id removes the pseudonym's entry too.
	vault.mu.Lock()
	delete(vault.keys, "default/a")
	vault.mu.Unlock()
	c.Drop("default", "a")
	if _, err := c.ByPseudonym(ctx, "default", "Pa"); !errors.Is(err, kuma.ErrEntityForgotten) {
		t.Fatalf("a by pseudonym after drop: %v, want entity_forgotten from the vault", err)
	}
	se := kuma.StreamEvent{Pseudonym: "Pa", Version: 1, Position: "p1.0.1"}
	if op, err := c.Open(ctx, "default", se); err != nil || !op.Forgotten || op.Entity != "" {
		t.Fatalf("open of a forgotten entity's event: %+v, %v", op, err)
	}
}

func (v *countingVault) count() int { v.mu.Lock(); defer v.mu.Unlock(); return v.calls }

func TestKeyCacheHitsBoundTTLAndShredBroadcast(t *testing.T) {
	ctx := t.Context()
	vault := &countingVault{keys: map[string][]byte{}}
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	var clock sync.Mutex
	c := New(vault, 2, time.Minute, func() time.Time { clock.Lock(); defer clock.Unlock(); return now }, telemetry.Tracer(nil))

	a1, err := c.Get(ctx, "default", "a", true)
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := c.Get(ctx, "default", "a", false)
	if a1 != a2 || vault.count() != 1 {
		t.Fatalf("second get: same key %v, vault calls %d; want a cache hit", a1 == a2, vault.count())
	}
	// Bounded: a third entity evicts the least recently used.
	c.Get(ctx, "default", "b", true)
	c.Get(ctx, "default", "a", false) // a is now most recent
	c.Get(ctx, "default", "c", true)  // evicts b
	before := vault.count()
	c.Get(ctx, "default", "a", false)
	if vault.count() != before {
		t.Fatal("a was evicted although b was older")
	}
	c.Get(ctx, "default", "b", false)
	if vault.count() != before+1 {
		t.Fatal("b was not evicted: the cache holds more than its bound")
	}
	// TTL: a stale entry is fetched again.
	clock.Lock()
	now = now.Add(2 * time.Minute)
	clock.Unlock()
	before = vault.count()
	c.Get(ctx, "default", "b", false)
	if vault.count() != before+1 {
		t.Fatal("an entry older than the TTL was served from the cache")
	}
	if hits, misses := c.Stats(); hits != 3 || misses != 5 {
		t.Fatalf("stats = %d hits, %d misses; want 3 and 5", hits, misses)
	}

	// A shred broadcast drops the key at once.
	srv, err := natsbus.StartServer(ctx, natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sub, err := c.SubscribeShredded(nc)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(vaultclient.Shredded{Context: "default", Entity: "b"})
	if err := nc.Publish(vaultclient.SubjectShredded, b); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		_, cached := c.entries[cacheKey{"default", "b"}]
		c.mu.Unlock()
		if !cached {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the shred broadcast did not drop the key")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestKeyCacheShareHoldsOneKeyAndCountsPerView: a view from Share finds
// the key another view fetched (the same *envelope.Key, no vault call),
// each view counts its own hits and misses, and a drop through either one
// drops the key for both.
func TestKeyCacheShareHoldsOneKeyAndCountsPerView(t *testing.T) {
	ctx := t.Context()
	vault := &countingVault{keys: map[string][]byte{}}
	node := New(vault, 10, time.Minute, time.Now, telemetry.Tracer(nil))
	proj := node.Share()

	k1, err := node.Get(ctx, "c", "e1", true)
	if err != nil {
		t.Fatal(err)
	}
	e, err := proj.ByPseudonym(ctx, "c", "Pe1")
	if err != nil {
		t.Fatal(err)
	}
	if e.Key != k1 || e.Entity != "e1" {
		t.Fatalf("the shared view found %p for %q, want the node's key %p for e1", e.Key, e.Entity, k1)
	}
	if vault.calls != 1 {
		t.Fatalf("%d vault calls, want 1: the shared view should have found the key", vault.calls)
	}
	if h, m := node.Stats(); h != 0 || m != 1 {
		t.Errorf("node view: %d hits, %d misses; want 0, 1", h, m)
	}
	if h, m := proj.Stats(); h != 1 || m != 0 {
		t.Errorf("shared view: %d hits, %d misses; want 1, 0", h, m)
	}

	proj.Drop("c", "e1")
	if _, err := node.Get(ctx, "c", "e1", false); err != nil {
		t.Fatal(err)
	}
	if vault.calls != 2 {
		t.Fatalf("%d vault calls after a drop through the other view, want 2", vault.calls)
	}
}
