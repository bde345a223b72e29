// Package keycache keeps entities' data keys near the code that seals and
// opens their events: bounded, with a TTL, and emptied of a key the moment the
// keyvault announces its shred. The shardnode, the projector and the Go
// client's subscriptions use it.
package keycache

import (
	"container/list"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// Vault is what the cache needs of the keyvault: the keyvault service
// implements it in process and vaultclient.Client over NATS.
type Vault interface {
	// DataKey returns the entity's key (creating it when create is set),
	// kuma.ErrNotFound when it has none, kuma.ErrEntityForgotten when it was
	// shredded.
	DataKey(ctx context.Context, kctx, entity string, create bool) ([]byte, error)
}

// Cache keeps ready AES keys of recently used entities: bounded (LRU) and
// with a TTL, so a key shredded by another node cannot live here for long
// even if its broadcast were missed. Safe for concurrent use.
type Cache struct {
	vault  Vault
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

// New returns a cache of at most max keys, each kept at most ttl; tracer
// records the vault calls (telemetry.Tracer(nil) for none).
func New(vault Vault, max int, ttl time.Duration, now func() time.Time, tracer trace.Tracer) *Cache {
	return &Cache{vault: vault, tracer: tracer, max: max, ttl: ttl, now: now, entries: map[cacheKey]*list.Element{}, lru: list.New()}
}

// Get returns the entity's key from the cache or the vault (see
// Vault.DataKey for its errors).
func (c *Cache) Get(ctx context.Context, kctx, entity string, create bool) (*envelope.Key, error) {
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

// Drop forgets a key at once (after a shred here or anywhere).
func (c *Cache) Drop(kctx, entity string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[cacheKey{kctx, entity}]; ok {
		c.removeLocked(e)
	}
}

func (c *Cache) removeLocked(e *list.Element) {
	delete(c.entries, e.Value.(*cacheEntry).k)
	c.lru.Remove(e)
}

// Stats returns hits and misses so far.
func (c *Cache) Stats() (hits, misses int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits, c.misses
}

// SubscribeShredded drops keys as the keyvault announces shreds, until the
// subscription is closed.
func (c *Cache) SubscribeShredded(nc *nats.Conn) (*nats.Subscription, error) {
	return nc.Subscribe(vaultclient.SubjectShredded, func(m *nats.Msg) {
		var s vaultclient.Shredded
		if json.Unmarshal(m.Data, &s) == nil {
			c.Drop(s.Context, s.Entity)
		}
	})
}

// Opened is a stream event with its payload opened.
type Opened struct {
	Type string
	Data []byte
	// Forgotten is set, with no Type and Data, when the entity's key was
	// shredded: the payload is noise for good.
	Forgotten bool
}

// Open opens a sealed stream event of context kctx. An entity whose key is
// gone comes back Forgotten, not as an error; a payload that does not open
// under its key is internal (tampered or misplaced), never skipped.
func (c *Cache) Open(ctx context.Context, kctx string, se kuma.StreamEvent) (Opened, error) {
	key, err := c.Get(ctx, kctx, se.Entity, false)
	switch {
	case errors.Is(err, kuma.ErrEntityForgotten):
		return Opened{Forgotten: true}, nil
	case err != nil:
		return Opened{}, fmt.Errorf("key of %s: %w", se.Entity, err)
	}
	plain, err := key.Open(se.Payload, envelope.AAD(envelope.PurposeEvent, kctx, se.Entity, se.Version))
	if err != nil {
		return Opened{}, kuma.Errorf(kuma.CodeInternal, "event %s of %s does not open: tampered or misplaced", se.Position, se.Entity)
	}
	typ, data, err := envelope.DecodeEvent(plain)
	if err != nil {
		return Opened{}, kuma.Errorf(kuma.CodeInternal, "event %s of %s is malformed", se.Position, se.Entity)
	}
	return Opened{Type: typ, Data: data}, nil
}
