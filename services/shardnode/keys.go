package shardnode

import (
	"container/list"
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// KeyVault is what a shardnode needs of the keyvault. The keyvault service
// implements it in process; vaultclient.Client implements it over NATS; the
// wiring chooses.
type KeyVault interface {
	// DataKey returns the entity's key (creating it when create is set),
	// kuma.ErrNotFound when it has none, kuma.ErrEntityForgotten when it was
	// shredded.
	DataKey(ctx context.Context, kctx, entity string, create bool) ([]byte, error)
	// Shred destroys the key; again, it returns the first record.
	Shred(ctx context.Context, r vaultclient.ShredRequest) (*kuma.ForgetReply, error)
	// Forgotten returns the forget record, or nil.
	Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error)
}

// keyCache keeps ready AES keys of recently used entities: bounded (LRU) and
// with a TTL, so a key shredded by another node cannot live here for long
// even if its broadcast were missed. Safe for concurrent use.
type keyCache struct {
	vault  KeyVault
	tracer trace.Tracer
	max    int
	ttl    time.Duration
	now    func() time.Time

	mu      sync.Mutex
	entries map[cacheKey]*list.Element
	lru     *list.List
	hits    int64
	misses  int64
}

type cacheKey struct{ ctx, entity string }

type cacheEntry struct {
	k       cacheKey
	key     *envelope.Key
	fetched time.Time
}

func newKeyCache(vault KeyVault, max int, ttl time.Duration, now func() time.Time, tracer trace.Tracer) *keyCache {
	return &keyCache{vault: vault, tracer: tracer, max: max, ttl: ttl, now: now, entries: map[cacheKey]*list.Element{}, lru: list.New()}
}

// get returns the entity's key from the cache or the vault.
func (c *keyCache) get(ctx context.Context, kctx, entity string, create bool) (*envelope.Key, error) {
	k := cacheKey{kctx, entity}
	c.mu.Lock()
	if e, ok := c.entries[k]; ok {
		ent := e.Value.(*cacheEntry)
		if c.now().Sub(ent.fetched) < c.ttl {
			c.lru.MoveToFront(e)
			c.hits++
			c.mu.Unlock()
			return ent.key, nil
		}
		c.removeLocked(e)
	}
	c.misses++
	c.mu.Unlock()

	ctx, span := c.tracer.Start(ctx, "kuma.keyvault DataKey", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.Bool("kuma.key.create", create)))
	raw, err := c.vault.DataKey(ctx, kctx, entity, create)
	span.End()
	if err != nil {
		return nil, err
	}
	key, err := envelope.NewKey(raw)
	clear(raw)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[k]; ok {
		c.removeLocked(e)
	}
	c.entries[k] = c.lru.PushFront(&cacheEntry{k: k, key: key, fetched: c.now()})
	for c.lru.Len() > c.max {
		c.removeLocked(c.lru.Back())
	}
	return key, nil
}

// drop forgets a key at once (after a shred here or anywhere).
func (c *keyCache) drop(kctx, entity string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[cacheKey{kctx, entity}]; ok {
		c.removeLocked(e)
	}
}

func (c *keyCache) removeLocked(e *list.Element) {
	delete(c.entries, e.Value.(*cacheEntry).k)
	c.lru.Remove(e)
}

// stats returns hits and misses.
func (c *keyCache) stats() (hits, misses int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits, c.misses
}

// subscribeShredded drops keys as the keyvault announces shreds.
func (c *keyCache) subscribeShredded(nc *nats.Conn) (*nats.Subscription, error) {
	return nc.Subscribe(vaultclient.SubjectShredded, func(m *nats.Msg) {
		var s vaultclient.Shredded
		if json.Unmarshal(m.Data, &s) == nil {
			c.drop(s.Context, s.Entity)
		}
	})
}
