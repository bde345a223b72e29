package keycache

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// gatedVault is a countingVault whose DataKey, while gate is set, tells
// entered that it has started and then waits for release: a fetch held in
// flight, so a test can shred in the middle of it.
type gatedVault struct {
	countingVault
	mu      sync.Mutex
	gate    bool
	entered chan struct{}
	release chan struct{}
}

func (v *gatedVault) DataKey(ctx context.Context, kctx, entity string, create bool) (vaultclient.KeyReply, error) {
	v.wait()
	return v.countingVault.DataKey(ctx, kctx, entity, create)
}

func (v *gatedVault) KeyByPseudonym(ctx context.Context, kctx, p string) (vaultclient.KeyReply, error) {
	v.wait()
	return v.countingVault.KeyByPseudonym(ctx, kctx, p)
}

func (v *gatedVault) wait() {
	v.mu.Lock()
	gated := v.gate
	v.mu.Unlock()
	if gated {
		v.entered <- struct{}{}
		<-v.release
	}
}

func (v *gatedVault) setGate(on bool) { v.mu.Lock(); v.gate = on; v.mu.Unlock() }

// TestDropDuringFetchIsNotUndone: a key fetched before a shred and back
// after the shred's drop is handed to its caller (it was valid when asked
// for) but not kept: the next Get asks the vault again, instead of serving
// the shredded key for the TTL. A fetch that starts after the drop is kept
// as usual. Deterministic: the vault holds the fetch until the drop is done.
func TestDropDuringFetchIsNotUndone(t *testing.T) {
	ctx := t.Context()
	vault := &gatedVault{countingVault: countingVault{keys: map[string][]byte{}},
		entered: make(chan struct{}), release: make(chan struct{})}
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	c := New(vault, 16, 10*time.Minute, func() time.Time { return now }, telemetry.Tracer(nil))
	if _, err := c.Get(ctx, "default", "e", true); err != nil { // the key exists
		t.Fatal(err)
	}
	c.Drop("default", "e") // an earlier shred elsewhere, say: empty again

	vault.setGate(true)
	got := make(chan error, 1)
	go func() {
		key, err := c.Get(ctx, "default", "e", false)
		if err == nil && key == nil {
			t.Error("Get returned neither a key nor an error")
		}
		got <- err
	}()
	<-vault.entered // the fetch is in flight
	c.Drop("default", "e")
	vault.setGate(false)
	close(vault.release)
	if err := <-got; err != nil {
		t.Fatalf("the fetch in flight: %v", err)
	}

	before := vault.count()
	if _, err := c.Get(ctx, "default", "e", false); err != nil {
		t.Fatal(err)
	}
	if vault.count() != before+1 {
		t.Fatal("a key fetched before the drop was kept after it: served from the cache without asking the vault")
	}
	// That later fetch began after the drop: it is kept.
	if _, err := c.Get(ctx, "default", "e", false); err != nil {
		t.Fatal(err)
	}
	if vault.count() != before+1 {
		t.Fatal("a key fetched after the drop was not kept")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.dropped) != 0 || c.inflight != 0 {
		t.Fatalf("%d drops and %d fetches remembered with no fetch under way", len(c.dropped), c.inflight)
	}
}

// TestDropDuringFetchByPseudonym: a consumer of the stream fetches a key by
// the entity's pseudonym; a shred's drop (by id) that comes while that fetch
// is under way keeps it out of the cache under both names.
func TestDropDuringFetchByPseudonym(t *testing.T) {
	ctx := t.Context()
	vault := &gatedVault{countingVault: countingVault{keys: map[string][]byte{}},
		entered: make(chan struct{}), release: make(chan struct{})}
	c := New(vault, 16, 10*time.Minute, time.Now, telemetry.Tracer(nil))
	if _, err := c.Get(ctx, "default", "e", true); err != nil {
		t.Fatal(err)
	}
	c.Drop("default", "e")
	vault.setGate(true)
	got := make(chan error, 1)
	go func() { _, err := c.ByPseudonym(ctx, "default", "Pe"); got <- err }()
	<-vault.entered
	c.Drop("default", "e")
	vault.setGate(false)
	close(vault.release)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	for _, get := range []func() error{
		func() error { _, err := c.Get(ctx, "default", "e", false); return err },
		func() error { _, err := c.ByPseudonym(ctx, "default", "Pe"); return err },
	} {
		before := vault.count()
		if err := get(); err != nil {
			t.Fatal(err)
		}
		if vault.count() != before+1 {
			t.Fatal("a key fetched by pseudonym before the drop was kept after it")
		}
		c.Drop("default", "e")
	}
}

// TestDropDuringOneOfTwoFetches: of two fetches of one key, the one under
// way when the drop came is not kept, the one that began after it is.
func TestDropDuringOneOfTwoFetches(t *testing.T) {
	ctx := t.Context()
	vault := &gatedVault{countingVault: countingVault{keys: map[string][]byte{}},
		entered: make(chan struct{}), release: make(chan struct{})}
	c := New(vault, 16, 10*time.Minute, time.Now, telemetry.Tracer(nil))
	if _, err := c.Get(ctx, "default", "e", true); err != nil {
		t.Fatal(err)
	}
	c.Drop("default", "e")
	vault.setGate(true)
	first := make(chan error, 1)
	go func() { _, err := c.Get(ctx, "default", "e", false); first <- err }()
	<-vault.entered
	c.Drop("default", "e")
	vault.setGate(false)
	// The second fetch starts after the drop and lands first.
	if _, err := c.Get(ctx, "default", "e", false); err != nil {
		t.Fatal(err)
	}
	close(vault.release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	before := vault.count()
	if _, err := c.Get(ctx, "default", "e", false); err != nil {
		t.Fatal(err)
	}
	if vault.count() != before {
		t.Fatal("the fetch that began after the drop was not kept")
	}
}
