package shardnode

import (
	"sort"
	"sync"
)

// feedCache keeps a shard's most recent events as the feed shows them,
// opened and encoded, so that followers at the tail (most of them, most of
// the time) share one decryption and one encoding per event instead of one
// each. It covers one contiguous run of positions, (from, to]: every event
// of the shard in that run that can be shown is in entries. A read after a
// position inside the run is served from memory; anything else reads the
// file and may extend or replace the run.
//
// Forgetting an entity drops its entries and bumps the generation, so an
// insert computed before the forget (with the key that has since been
// destroyed) is refused rather than bringing the entity back.
type feedCache struct {
	mu       sync.Mutex
	from, to int64
	entries  []feedEntry // ascending seq, all in (from, to]
	bytes    int
	max      int
	gen      uint64
}

// feedEntry is one encoded event, with what filters need.
type feedEntry struct {
	seq, time   int64
	entity, typ string
	json        []byte
}

func newFeedCache(maxBytes int) *feedCache { return &feedCache{max: maxBytes} }

// generation is read before a file read whose result may be inserted.
func (c *feedCache) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

// after returns the cached entries after position after, and the end of
// the run they cover; ok is false when after is outside the run.
func (c *feedCache) after(after int64) (out []feedEntry, to int64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.to == 0 || after < c.from || after >= c.to {
		return nil, 0, false
	}
	i := sort.Search(len(c.entries), func(i int) bool { return c.entries[i].seq > after })
	// The entries are never changed in place (forget rebuilds the slice),
	// so the caller may read this slice without the lock.
	return c.entries[i:len(c.entries):len(c.entries)], c.to, true
}

// insert records that (after, to] holds exactly entries (read at
// generation gen). A run that continues the cached one extends it; a newer
// disjoint one replaces it (followers are at the tail); an older one is
// dropped.
func (c *feedCache) insert(gen uint64, after, to int64, entries []feedEntry) {
	if to <= after {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	switch {
	case c.to != 0 && after == c.to:
		c.entries = append(c.entries, entries...)
	case c.to == 0 || after > c.to:
		c.entries = append([]feedEntry(nil), entries...)
		c.from, c.bytes = after, 0
	default:
		return // inside or before the run: nothing new
	}
	c.to = to
	for _, e := range entries {
		c.bytes += len(e.json) + len(e.entity) + len(e.typ) + 64
	}
	// Evict from the oldest end, and copy what stays now and then so the
	// dropped entries' array can be freed.
	drop := 0
	for c.bytes > c.max && drop < len(c.entries) {
		e := c.entries[drop]
		c.bytes -= len(e.json) + len(e.entity) + len(e.typ) + 64
		c.from = e.seq
		drop++
	}
	if drop > 0 {
		c.entries = append([]feedEntry(nil), c.entries[drop:]...)
	}
}

// forget drops every entry of entity.
func (c *feedCache) forget(entity string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	kept := make([]feedEntry, 0, len(c.entries))
	for _, e := range c.entries {
		if e.entity == entity {
			c.bytes -= len(e.json) + len(e.entity) + len(e.typ) + 64
			continue
		}
		kept = append(kept, e)
	}
	c.entries = kept
}
