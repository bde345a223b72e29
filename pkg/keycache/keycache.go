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
	"sync/atomic"
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
	// DataKey returns the entity's key and pseudonym (creating the key when
	// create is set), kuma.ErrNotFound when it has none,
	// kuma.ErrEntityForgotten when it was shredded.
	DataKey(ctx context.Context, kctx, entity string, create bool) (vaultclient.KeyReply, error)
	// KeyByPseudonym returns the key and id of the entity a stream message
	// names by pseudonym, with the same errors.
	KeyByPseudonym(ctx context.Context, kctx, pseudonym string) (vaultclient.KeyReply, error)
}

// Cache keeps ready AES keys of recently used entities: bounded (LRU) and
// with a TTL, so a key shredded by another node cannot live here for long
// even if its broadcast were missed. An entry is found by the entity's id or
// by its pseudonym (how the event stream names it). Safe for concurrent use.
type Cache struct {
	*store
	// Each view of the store (Share) counts its own hits and misses, so
	// that the services sharing one report their own use of it.
	hits, misses *atomic.Int64
}

// store is the cache's content, shared by its views.
type store struct {
	vault  Vault
	tracer trace.Tracer
	max    int
	ttl    time.Duration
	now    func() time.Time

	mu      sync.Mutex
	entries map[cacheKey]*list.Element
	byP     map[cacheKey]*list.Element // by (context, pseudonym)
	lru     *list.List
	// A key fetched before a shred can come back after the shred's
	// broadcast dropped it. Every Drop takes the next epoch and, while
	// fetches are under way, is remembered in dropped (by id); a fetch
	// whose entity was dropped after the fetch began gives its key to its
	// caller (it was valid when the caller asked) but never keeps it, or
	// it would live on for the TTL after the shred. dropped is emptied
	// whenever no fetch is under way, so it stays small.
	epoch    uint64
	inflight int
	dropped  map[cacheKey]uint64
}

type cacheKey struct{ ctx, entity string }

type cacheEntry struct {
	k       cacheKey
	p       cacheKey // (context, pseudonym)
	key     *envelope.Key
	fetched time.Time
}

// Entry is an entity's key with both its names.
type Entry struct {
	Key       *envelope.Key
	Entity    string
	Pseudonym string
}

// New returns a cache of at most max keys, each kept at most ttl; tracer
// records the vault calls (telemetry.Tracer(nil) for none).
func New(vault Vault, max int, ttl time.Duration, now func() time.Time, tracer trace.Tracer) *Cache {
	return &Cache{store: &store{vault: vault, tracer: tracer, max: max, ttl: ttl, now: now,
		entries: map[cacheKey]*list.Element{}, byP: map[cacheKey]*list.Element{}, lru: list.New(), dropped: map[cacheKey]uint64{}},
		hits: new(atomic.Int64), misses: new(atomic.Int64)}
}

// Share returns another view of the same cache, with hit and miss counts of
// its own: the services of one process share one cache of keys, so that an
// entity's key is held once, and each still reports its own use of it.
func (c *Cache) Share() *Cache {
	return &Cache{store: c.store, hits: new(atomic.Int64), misses: new(atomic.Int64)}
}

// Get returns the entity's key from the cache or the vault (see
// Vault.DataKey for its errors).
func (c *Cache) Get(ctx context.Context, kctx, entity string, create bool) (*envelope.Key, error) {
	e, err := c.get(ctx, kctx, entity, "", create)
	return e.Key, err
}

// Entry is Get with the entity's pseudonym.
func (c *Cache) Entry(ctx context.Context, kctx, entity string, create bool) (Entry, error) {
	return c.get(ctx, kctx, entity, "", create)
}

// ByPseudonym returns the key and id of the entity a stream message names by
// pseudonym (see Vault.KeyByPseudonym for its errors).
func (c *Cache) ByPseudonym(ctx context.Context, kctx, pseudonym string) (Entry, error) {
	return c.get(ctx, kctx, "", pseudonym, false)
}

// get finds an entry by id, or by pseudonym when entity is empty.
func (c *Cache) get(ctx context.Context, kctx, entity, pseudonym string, create bool) (Entry, error) {
	index, k := c.entries, cacheKey{kctx, entity}
	if entity == "" {
		index, k = c.byP, cacheKey{kctx, pseudonym}
	}
	c.mu.Lock()
	if e, ok := index[k]; ok {
		ent := e.Value.(*cacheEntry)
		if c.now().Sub(ent.fetched) < c.ttl {
			c.lru.MoveToFront(e)
			c.hits.Add(1)
			c.mu.Unlock()
			return Entry{Key: ent.key, Entity: ent.k.entity, Pseudonym: ent.p.entity}, nil
		}
		c.removeLocked(e)
	}
	c.misses.Add(1)
	began := c.epoch
	c.inflight++
	c.mu.Unlock()

	ctx, span := c.tracer.Start(ctx, "kuma.keyvault DataKey", trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.Bool("kuma.key.create", create)))
	var reply vaultclient.KeyReply
	var err error
	if entity != "" {
		reply, err = c.vault.DataKey(ctx, kctx, entity, create)
	} else {
		reply, err = c.vault.KeyByPseudonym(ctx, kctx, pseudonym)
	}
	span.End()
	var key *envelope.Key
	if err == nil {
		key, err = envelope.NewKey(reply.Key)
		clear(reply.Key)
	}
	if err == nil && entity == "" && (reply.Entity == "" || reply.Pseudonym != pseudonym) {
		err = kuma.Errorf(kuma.CodeInternal, "the keyvault answered a pseudonym without its entity")
	}
	ent := &cacheEntry{k: cacheKey{kctx, reply.Entity}, p: cacheKey{kctx, reply.Pseudonym}, key: key, fetched: c.now()}
	if entity != "" {
		ent.k.entity = entity
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	dropped := c.dropped[ent.k] > began
	if c.inflight--; c.inflight == 0 {
		clear(c.dropped)
	}
	if err != nil {
		return Entry{}, err
	}
	if dropped {
		// Fetched before a shred and back after its drop: not kept.
		return Entry{Key: key, Entity: ent.k.entity, Pseudonym: ent.p.entity}, nil
	}
	if e, ok := c.entries[ent.k]; ok {
		c.removeLocked(e)
	}
	if e, ok := c.byP[ent.p]; ok && ent.p.entity != "" {
		c.removeLocked(e)
	}
	el := c.lru.PushFront(ent)
	c.entries[ent.k] = el
	if ent.p.entity != "" {
		c.byP[ent.p] = el
	}
	for c.lru.Len() > c.max {
		c.removeLocked(c.lru.Back())
	}
	return Entry{Key: key, Entity: ent.k.entity, Pseudonym: ent.p.entity}, nil
}

// Drop forgets a key at once (after a shred here or anywhere), and makes
// sure that a fetch of it already under way, by id or by pseudonym, does not
// put it back.
func (c *Cache) Drop(kctx, entity string) {
	k := cacheKey{kctx, entity}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[k]; ok {
		c.removeLocked(e)
	}
	c.epoch++
	if c.inflight > 0 {
		c.dropped[k] = c.epoch
	}
}

func (c *Cache) removeLocked(e *list.Element) {
	ent := e.Value.(*cacheEntry)
	if c.entries[ent.k] == e {
		delete(c.entries, ent.k)
	}
	if c.byP[ent.p] == e {
		delete(c.byP, ent.p)
	}
	c.lru.Remove(e)
}

// Stats returns this view's hits and misses so far.
func (c *Cache) Stats() (hits, misses int64) {
	return c.hits.Load(), c.misses.Load()
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
	// Entity is the event's entity id, and Pseudonym its name in the
	// stream (empty for a message written before pseudonyms whose entity
	// is forgotten).
	Entity    string
	Pseudonym string
	Type      string
	Data      []byte
	// Forgotten is set, with no Type and Data, when the entity's key was
	// shredded: the payload is noise for good. Entity is then empty if the
	// message named the entity by pseudonym: nothing leads to the id any more.
	Forgotten bool
}

// Resolve finds the key and the id of a stream event's entity, by its
// pseudonym, or by its id in a message written before pseudonyms. An entity
// whose key is gone comes back forgotten, not as an error.
func (c *Cache) Resolve(ctx context.Context, kctx string, se kuma.StreamEvent) (e Entry, forgotten bool, err error) {
	if se.Pseudonym != "" {
		e, err = c.ByPseudonym(ctx, kctx, se.Pseudonym)
	} else {
		e, err = c.Entry(ctx, kctx, se.Entity, false)
	}
	switch {
	case errors.Is(err, kuma.ErrEntityForgotten):
		return Entry{Entity: se.Entity, Pseudonym: se.Pseudonym}, true, nil
	case errors.Is(err, kuma.ErrBadRequest):
		return Entry{}, false, kuma.Errorf(kuma.CodeInternal, "event %s names its entity by a malformed pseudonym", se.Position)
	case err != nil && se.Pseudonym != "":
		return Entry{}, false, fmt.Errorf("key of the entity of event %s: %w", se.Position, err)
	case err != nil:
		return Entry{}, false, fmt.Errorf("key of %s: %w", se.Entity, err)
	}
	return e, false, nil
}

// Open opens a sealed stream event of context kctx. An entity whose key is
// gone comes back Forgotten, not as an error; a payload that does not open
// under its key is internal (tampered or misplaced), never skipped.
func (c *Cache) Open(ctx context.Context, kctx string, se kuma.StreamEvent) (Opened, error) {
	e, forgotten, err := c.Resolve(ctx, kctx, se)
	if err != nil {
		return Opened{}, err
	}
	if forgotten {
		return Opened{Entity: e.Entity, Pseudonym: e.Pseudonym, Forgotten: true}, nil
	}
	// The associated data binds the payload to the entity's id: a
	// pseudonym moved onto another entity's event does not open.
	plain, err := e.Key.Open(se.Payload, envelope.AAD(envelope.PurposeEvent, kctx, e.Entity, se.Version))
	if err != nil {
		return Opened{}, kuma.Errorf(kuma.CodeInternal, "event %s does not open: tampered or misplaced", se.Position)
	}
	typ, data, err := envelope.DecodeEvent(plain)
	if err != nil {
		return Opened{}, kuma.Errorf(kuma.CodeInternal, "event %s is malformed", se.Position)
	}
	return Opened{Entity: e.Entity, Pseudonym: e.Pseudonym, Type: typ, Data: data}, nil
}
