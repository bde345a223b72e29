package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Lease is a shard's ownership record. Owner "" means released: free for
// the next owner, who takes it with Epoch+1.
type Lease struct {
	Context   string `json:"context"`
	Shard     int    `json:"shard"`
	Owner     string `json:"owner"`
	Epoch     int64  `json:"epoch"`
	HandoffTo string `json:"handoff_to,omitempty"` // set by a graceful release
	// Serving is set by the owner once it has caught the shard up and
	// answers its requests, and kept when it releases the lease. The
	// previous owner keeps refusing requests (so that none is lost in
	// between) until it sees it; the next owner trusts a copy written
	// under this epoch as whole only if it is set.
	Serving bool `json:"serving,omitempty"`
	// Wrote is the newest epoch that served, this lease's own or one
	// before it: events were written under no later epoch (an owner
	// writes only once its lease says Serving). Carried from lease to
	// lease, so that takes that failed in between do not hide it.
	Wrote int64 `json:"wrote,omitempty"`
	// Revision is the KV revision the lease was read at; Renewed the
	// server's time of that write (neither is stored in the value).
	Revision uint64    `json:"-"`
	Renewed  time.Time `json:"-"`
}

// LastServed is the newest epoch that served as of this lease (0: none
// known; a lease written before Wrote existed and never serving).
func (l Lease) LastServed() int64 {
	if l.Serving {
		return l.Epoch
	}
	return l.Wrote
}

// Expired reports whether the holder has missed its renewals past ttl.
func (l Lease) Expired(now time.Time, ttl time.Duration) bool {
	return l.Owner == "" || now.After(l.Renewed.Add(ttl))
}

// ErrConflict is a lost compare-and-set: someone else changed the lease.
var ErrConflict = errors.New("cluster: the lease changed under us")

func decodeLease(e jetstream.KeyValueEntry) (Lease, error) {
	var l Lease
	if err := json.Unmarshal(e.Value(), &l); err != nil {
		return l, err
	}
	l.Revision, l.Renewed = e.Revision(), e.Created()
	return l, nil
}

func leaseKey(kctx string, shard int) string { return "lease." + kctx + "." + strconv.Itoa(shard) }

func pinKey(kctx string, shard int) string { return "pin." + kctx + "." + strconv.Itoa(shard) }

// Lease returns the shard's lease as last seen, and whether there is one.
func (s *Store) Lease(kctx string, shard int) (Lease, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.leaseCache[leaseKey(kctx, shard)]
	return l, ok
}

// Pin returns the node an operator pinned the shard to ("" if none).
func (s *Store) Pin(kctx string, shard int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pinCache[pinKey(kctx, shard)]
}

// ShardCount is kctx's shard count as the cluster recorded it (AgreeShards);
// ok is false when no node has served kctx yet.
func (s *Store) ShardCount(ctx context.Context, kctx string) (n int, ok bool, err error) {
	e, err := s.leases.Get(ctx, shardsKey(kctx))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	if n, err = strconv.Atoi(string(e.Value())); err != nil || n < 1 {
		return 0, false, fmt.Errorf("cluster: %s in %s holds %q, not a shard count", shardsKey(kctx), LeasesBucket, e.Value())
	}
	return n, true, nil
}

// SetPin pins a shard to a node (`kuma migrate`); node "" removes the pin.
func (s *Store) SetPin(ctx context.Context, kctx string, shard int, node string) error {
	return SetPin(ctx, s.leases, kctx, shard, node)
}

// shardsKey is where the leases bucket records a context's shard count.
func shardsKey(kctx string) string { return "shards." + kctx }

// AgreeShards records kctx's shard count in the cluster when a node first
// serves it, and refuses a node configured with another count. Entities
// are placed by xxhash mod shards: two nodes that disagree would each look
// for an entity on another shard, and its history would split between
// them. Every shardnode checks at start; a cluster from before the record
// gets it from the first node that starts.
func (s *Store) AgreeShards(ctx context.Context, kctx string, shards int) error {
	key := shardsKey(kctx)
	_, err := s.leases.Create(ctx, key, []byte(strconv.Itoa(shards)))
	if err == nil || !errors.Is(err, jetstream.ErrKeyExists) {
		return err
	}
	e, err := s.leases.Get(ctx, key)
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(string(e.Value()))
	if err != nil {
		return fmt.Errorf("cluster: %s in %s holds %q, not a shard count", key, LeasesBucket, e.Value())
	}
	if n != shards {
		return fmt.Errorf("context %q has %d shards in this cluster (recorded when a node first served it), and this node is configured with %d: "+
			"entities are placed by xxhash mod shards, so the nodes would disagree on where each one lives. Start this node with --shards %d",
			kctx, n, shards, n)
	}
	return nil
}

// SetPin pins a shard through a leases bucket handle, for tools that are
// not members (the CLI).
func SetPin(ctx context.Context, leases jetstream.KeyValue, kctx string, shard int, node string) error {
	if node == "" {
		err := leases.Delete(ctx, pinKey(kctx, shard))
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		return err
	}
	if err := ValidateNode(node); err != nil {
		return err
	}
	_, err := leases.Put(ctx, pinKey(kctx, shard), []byte(node))
	return err
}

// Acquire takes the shard's lease for this node: it creates the first lease,
// or replaces prev (read from the bucket) with epoch prev.Epoch+1 only if
// nobody has changed it since. ErrConflict means someone else did. The epoch
// is at least floor.
func (s *Store) Acquire(ctx context.Context, kctx string, shard int, prev *Lease, floor int64) (Lease, error) {
	l := Lease{Context: kctx, Shard: shard, Owner: s.cfg.Node, Epoch: max(1, floor)}
	if prev != nil {
		l.Epoch = max(prev.Epoch+1, floor)
		l.Wrote = prev.LastServed()
	}
	return s.write(ctx, l, prev)
}

// Renew rewrites the lease unchanged, moving its timestamp.
func (s *Store) Renew(ctx context.Context, l Lease) (Lease, error) {
	next := l
	next.HandoffTo = ""
	return s.write(ctx, next, &l)
}

// Serve renews the lease marked Serving: its owner now answers requests.
func (s *Store) Serve(ctx context.Context, l Lease) (Lease, error) {
	next := l
	next.HandoffTo, next.Serving, next.Wrote = "", true, l.Epoch
	return s.write(ctx, next, &l)
}

// Release gives the lease up, naming the node it hands the shard to.
func (s *Store) Release(ctx context.Context, l Lease, to string) (Lease, error) {
	next := l
	next.Owner, next.HandoffTo = "", to // Serving stays: did the owner ever serve?
	return s.write(ctx, next, &l)
}

func (s *Store) write(ctx context.Context, l Lease, prev *Lease) (Lease, error) {
	b, _ := json.Marshal(l)
	key := leaseKey(l.Context, l.Shard)
	var rev uint64
	var err error
	if prev == nil {
		rev, err = s.leases.Create(ctx, key, b)
	} else {
		rev, err = s.leases.Update(ctx, key, b, prev.Revision)
	}
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return Lease{}, ErrConflict
	}
	if err != nil {
		return Lease{}, fmt.Errorf("cluster: write lease %s: %w", key, err)
	}
	// Others judge expiry by the server's timestamp of this write, which
	// they get from their watch. The writer needs none (it stops writing on
	// its own monotonic deadline), so no read-back: with three replicas a
	// read may be served by a follower that has not applied the write yet.
	got := l
	got.Revision, got.Renewed = rev, s.cfg.Now()
	s.mu.Lock()
	if old, ok := s.leaseCache[key]; !ok || old.Revision < got.Revision {
		s.leaseCache[key] = got
	}
	s.mu.Unlock()
	return got, nil
}
