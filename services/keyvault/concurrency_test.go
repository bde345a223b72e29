package keyvault_test

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
)

// --- concurrency -------------------------------------------------------------

func TestConcurrentDataKeyCreates(t *testing.T) {
	const entities, perEntity = 50, 4
	forBothPaths(t, func(t *testing.T, api keyAPI, kv *keyvault.Service) {
		ctx := t.Context()
		var (
			mu   sync.Mutex
			got  = map[string][][]byte{}
			errs []error
			wg   sync.WaitGroup
		)
		for i := range entities * perEntity {
			e := fmt.Sprintf("entity_%d", i%entities)
			wg.Go(func() {
				k, err := api.DataKey(ctx, "default", e, true)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", e, err))
					return
				}
				got[e] = append(got[e], k.Key)
			})
		}
		wg.Wait()
		for _, err := range errs {
			t.Errorf("concurrent DataKey: got error %v, want a key", err)
		}
		if len(got) != entities {
			t.Fatalf("entities with keys: got %d, want %d", len(got), entities)
		}
		seen := map[string]string{}
		for e, ks := range got {
			if len(ks) != perEntity {
				t.Errorf("%s: got %d keys, want %d", e, len(ks), perEntity)
			}
			for _, k := range ks[1:] {
				if !bytes.Equal(k, ks[0]) {
					t.Errorf("%s: got different keys %x and %x from concurrent creates, want one", e, ks[0], k)
				}
			}
			if prev, dup := seen[string(ks[0])]; dup {
				t.Errorf("%s and %s got the same key", prev, e)
			}
			seen[string(ks[0])] = e
			// The key every caller got is the stored one.
			if stored := mustKey(t, kv, "default", e, false); !bytes.Equal(stored, ks[0]) {
				t.Errorf("%s: stored key %x, callers got %x", e, stored, ks[0])
			}
		}
	})
}

// TestConcurrentShredAndCreate races creates of an entity against its shred:
// whatever order they run in, each create either gets a key or
// entity_forgotten, and the entity ends forgotten with no key to be had.
func TestConcurrentShredAndCreate(t *testing.T) {
	const entities, creators = 20, 5
	forBothPaths(t, func(t *testing.T, api keyAPI, _ *keyvault.Service) {
		ctx := t.Context()
		var wg sync.WaitGroup
		errc := make(chan error, entities*(creators+1))
		for i := range entities {
			e := fmt.Sprintf("race_%d", i)
			for range creators {
				wg.Go(func() {
					_, err := api.DataKey(ctx, "default", e, true)
					if err != nil && !errors.Is(err, kuma.ErrEntityForgotten) {
						errc <- fmt.Errorf("DataKey(%s): %w", e, err)
					}
				})
			}
			wg.Go(func() {
				if _, err := api.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: e, At: fixedNow}); err != nil {
					errc <- fmt.Errorf("Shred(%s): %w", e, err)
				}
			})
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Errorf("got %v, want success or entity_forgotten", err)
		}
		for i := range entities {
			e := fmt.Sprintf("race_%d", i)
			_, err := api.DataKey(ctx, "default", e, true)
			wantCode(t, "DataKey after the race of "+e, err, kuma.ErrEntityForgotten)
		}
	})
}
