// Package cluster holds what shardnodes agree on through NATS: who is a
// member (heartbeats in a KV bucket), who owns which shard (a lease per
// shard, a KV key changed only by compare-and-set and carrying an epoch),
// where each shard should live (rendezvous hashing over the live members,
// or an operator's pin) and the shards' uploaded snapshots (an object
// store). Kuma writes no consensus of its own: JetStream's replicated KV is
// the only arbiter, and every decision is a compare-and-set against it.
//
// Time: a lease is judged expired by its readers when the server's
// timestamp of its last renewal plus the lease TTL is in their past, and its
// holder stops writing well before (Holder.Deadline). That needs clocks
// within a fraction of the TTL of each other (NTP is enough); the epoch in
// the shard file and the stream's compare-and-set fence an owner whose clock
// or process misbehaves anyway.
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/nats-io/nats.go/jetstream"
)

// Bucket names. They are account-wide: one set serves every context.
const (
	MembersBucket   = "KUMA_MEMBERS"
	LeasesBucket    = "KUMA_LEASES"
	SnapshotsBucket = "KUMA_SNAPSHOTS"
	// KeysBucket holds the keyvault's wrapped data keys and tombstones
	// (services/keyvault/jetstreamstore.go).
	KeysBucket = "KUMA_KEYS"
)

// Config of a node's view of the cluster.
type Config struct {
	// Node is this node's name, unique in the cluster: a KV key token.
	Node string
	// Replicas of the buckets (1 alone, 3 from three JetStream servers).
	Replicas int
	// MemberTTL: a member not heard from for this long is gone (default 5 s).
	MemberTTL time.Duration
	// LeaseTTL: a lease not renewed for this long may be taken (default 6 s).
	LeaseTTL time.Duration
	Logger   *slog.Logger
	Now      func() time.Time
}

func (c *Config) setDefaults() {
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	if c.MemberTTL <= 0 {
		c.MemberTTL = 5 * time.Second
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 6 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

var nodeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)

// ValidateNode checks a node name: it is a KV key and a subject token.
func ValidateNode(name string) error {
	if !nodeName.MatchString(name) {
		return fmt.Errorf("node name %q: want letters, digits, '-' and '_' (at most 63), starting with a letter or digit", name)
	}
	return nil
}

// NodeNameFromHost makes a node name of a host name: its first label, with
// anything a node name may not hold (see ValidateNode) replaced by
// '-', so that a host named ip-10-0-0-7.ec2.internal is node ip-10-0-0-7.
func NodeNameFromHost(host string) string {
	host, _, _ = strings.Cut(host, ".")
	b := []byte(host)
	for i, ch := range b {
		switch {
		case i == 0 && (ch == '-' || ch == '_'):
			b[i] = 'x' // a name starts with a letter or digit
		case !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_'):
			b[i] = '-'
		}
	}
	if len(b) > 63 {
		b = b[:63]
	}
	if len(b) == 0 {
		return "kuma"
	}
	return string(b)
}

// DefaultNodeName is a node's name when none is given: its host's, made a
// valid node name (NodeNameFromHost). Every service that names itself
// takes it from here, so that one process's shardnode, projector and
// members record agree.
func DefaultNodeName() string {
	host, _ := os.Hostname()
	return NodeNameFromHost(host)
}

// Member is one node as the members bucket has it.
type Member struct {
	Node     string    `json:"node"`
	Started  time.Time `json:"started"`
	Draining bool      `json:"draining,omitempty"` // leaving: owns nothing new
	// Contexts are the contexts the node serves. The members bucket is
	// shared by every context on one NATS, and a node must never be handed
	// a shard of a context it does not serve (nobody would ever own it).
	// Empty: every context (a node from before this field).
	Contexts []string `json:"contexts,omitempty"`
	// Refuses names the shards (ShardName) the node will not serve: their
	// files are damaged there, so placement gives them to another member
	// until an operator restores the file and restarts the node. Without
	// it the shard's place stayed on the damaged node and nobody served it.
	Refuses []string `json:"refuses,omitempty"`
	// Seen is the server's time of the last heartbeat (not stored).
	Seen time.Time `json:"-"`
}

// Serves reports whether the member serves context kctx.
func (m Member) Serves(kctx string) bool {
	return len(m.Contexts) == 0 || slices.Contains(m.Contexts, kctx)
}

// Refused reports whether the member will not serve shard n of kctx.
func (m Member) Refused(kctx string, n int) bool {
	return slices.Contains(m.Refuses, ShardName(kctx, n))
}

// ShardName names shard n of kctx in member records: "<ctx>/<n>".
func ShardName(kctx string, n int) string { return kctx + "/" + strconv.Itoa(n) }

// ServingMembers returns the members that serve kctx.
func ServingMembers(members []Member, kctx string) []Member {
	out := make([]Member, 0, len(members))
	for _, m := range members {
		if m.Serves(kctx) {
			out = append(out, m)
		}
	}
	return out
}

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

// Store is a node's handle on the cluster's buckets. Safe for concurrent use.
type Store struct {
	cfg     Config
	members jetstream.KeyValue
	leases  jetstream.KeyValue
	snaps   jetstream.ObjectStore
	// snapStream is the object store's stream, where a replaced
	// snapshot's chunks are erased (snapshots.go), in the background:
	// erasing ends with Close.
	snapStream  jetstream.Stream
	erasing     sync.WaitGroup
	eraseCtx    context.Context
	eraseCancel context.CancelFunc

	mu          sync.Mutex
	memberCache map[string]Member
	leaseCache  map[string]Lease
	pinCache    map[string]string
	watchers    []jetstream.KeyWatcher
	changed     chan struct{}
	ready       chan struct{}
}

// Open creates (or updates the replicas of) the buckets and starts watching
// members, leases and pins. Close stops the watches.
func Open(ctx context.Context, js jetstream.JetStream, cfg Config) (*Store, error) {
	cfg.setDefaults()
	if err := ValidateNode(cfg.Node); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	s := &Store{cfg: cfg, memberCache: map[string]Member{}, leaseCache: map[string]Lease{}, pinCache: map[string]string{},
		changed: make(chan struct{}, 1)}
	var err error
	s.members, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: MembersBucket, Description: "Kuma shardnodes and their heartbeats",
		History: 1, Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: bucket %s: %w", MembersBucket, err)
	}
	s.leases, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: LeasesBucket, Description: "Kuma shard leases (owner, epoch) and operator pins",
		History: 1, Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: bucket %s: %w", LeasesBucket, err)
	}
	s.snaps, err = js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket: SnapshotsBucket, Description: "Kuma shard snapshots, for moves and failover",
		Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: object store %s: %w", SnapshotsBucket, err)
	}
	if s.snapStream, err = js.Stream(ctx, "OBJ_"+SnapshotsBucket); err != nil {
		return nil, fmt.Errorf("cluster: object store %s: %w", SnapshotsBucket, err)
	}
	s.eraseCtx, s.eraseCancel = context.WithCancel(context.Background())
	s.sweepSnapshots()
	if err := s.watch(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// watch keeps the caches current. Open returns once each watch has
// delivered the bucket's current values.
func (s *Store) watch(ctx context.Context) error {
	wm, err := s.members.WatchAll(context.Background())
	if err != nil {
		return fmt.Errorf("cluster: watch members: %w", err)
	}
	wl, err := s.leases.WatchAll(context.Background())
	if err != nil {
		_ = wm.Stop()
		return fmt.Errorf("cluster: watch leases: %w", err)
	}
	s.watchers = []jetstream.KeyWatcher{wm, wl}
	var initial sync.WaitGroup
	initial.Add(2)
	go s.follow(wm, &initial, s.onMember)
	go s.follow(wl, &initial, s.onLease)
	done := make(chan struct{})
	go func() { initial.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("cluster: reading the buckets: %w", ctx.Err())
	}
}

func (s *Store) follow(w jetstream.KeyWatcher, initial *sync.WaitGroup, on func(jetstream.KeyValueEntry)) {
	first := true
	for e := range w.Updates() {
		if e == nil { // end of the current values
			if first {
				initial.Done()
				first = false
			}
			continue
		}
		on(e)
	}
	if first {
		initial.Done()
	}
}

func (s *Store) onMember(e jetstream.KeyValueEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.memberCache[e.Key()]
	if e.Operation() != jetstream.KeyValuePut {
		delete(s.memberCache, e.Key())
		s.nudge()
		return
	}
	var m Member
	if err := json.Unmarshal(e.Value(), &m); err != nil {
		s.cfg.Logger.Warn("cluster: unreadable member entry", "key", e.Key(), "err", err)
		return
	}
	m.Seen = e.Created()
	s.memberCache[e.Key()] = m
	if !had || old.Draining != m.Draining || !old.Started.Equal(m.Started) {
		s.nudge() // a member came or is leaving; a heartbeat changes nothing
	}
}

// Changed is signalled (at most one pending signal) when the placement of
// shards may have changed: a member came, left or started draining, a pin
// changed, or a lease changed hands or was released. A node reacts at once
// instead of on its next tick, which is most of a move's gap.
func (s *Store) Changed() <-chan struct{} { return s.changed }

func (s *Store) nudge() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *Store) onLease(e jetstream.KeyValueEntry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := e.Key()
	if strings.HasPrefix(key, "shards.") {
		return // a context's shard count (AgreeShards), read when checked
	}
	if strings.HasPrefix(key, "pin.") {
		if e.Operation() != jetstream.KeyValuePut {
			delete(s.pinCache, key)
		} else {
			s.pinCache[key] = string(e.Value())
		}
		s.nudge()
		return
	}
	if e.Operation() != jetstream.KeyValuePut {
		delete(s.leaseCache, key)
		s.nudge()
		return
	}
	l, err := decodeLease(e)
	if err != nil {
		s.cfg.Logger.Warn("cluster: unreadable lease", "key", key, "err", err)
		return
	}
	old, ok := s.leaseCache[key]
	if ok && old.Revision > l.Revision {
		return // our own write already recorded a newer one
	}
	s.leaseCache[key] = l
	if !ok || old.Owner != l.Owner || old.HandoffTo != l.HandoffTo || old.Serving != l.Serving {
		s.nudge()
	}
}

func decodeLease(e jetstream.KeyValueEntry) (Lease, error) {
	var l Lease
	if err := json.Unmarshal(e.Value(), &l); err != nil {
		return l, err
	}
	l.Revision, l.Renewed = e.Revision(), e.Created()
	return l, nil
}

// closeWait bounds Close. Stopping a watch deletes its consumer, which
// waits for the bucket's stream to answer; a stream that lost its quorum
// (the whole cluster stopping) answers nothing for seconds. A consumer
// left behind is ephemeral: the server removes it once it is idle.
const closeWait = 500 * time.Millisecond

// Close stops the watches, waiting at most closeWait for the server.
func (s *Store) Close() {
	ws := s.watchers
	s.watchers = nil
	if s.eraseCancel != nil {
		s.eraseCancel() // an erase cut short is finished by the next Open's sweep
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, w := range ws {
			_ = w.Stop()
		}
		s.erasing.Wait()
	}()
	select {
	case <-done:
	case <-time.After(closeWait):
		s.cfg.Logger.Debug("cluster: the watches' consumers were not deleted in time; the server drops them when idle")
	}
}

// Config returns the effective configuration.
func (s *Store) Config() Config { return s.cfg }

// Heartbeat records this node as alive (and draining or not).
func (s *Store) Heartbeat(ctx context.Context, m Member) error {
	m.Node = s.cfg.Node
	b, _ := json.Marshal(m)
	if _, err := s.members.Put(ctx, m.Node, b); err != nil {
		return fmt.Errorf("cluster: heartbeat: %w", err)
	}
	return nil
}

// Leave removes this node from the members at once (a graceful stop).
func (s *Store) Leave(ctx context.Context) error {
	return s.members.Delete(ctx, s.cfg.Node)
}

// Members returns the live members, by name.
func (s *Store) Members() []Member {
	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Member, 0, len(s.memberCache))
	for _, m := range s.memberCache {
		if now.Sub(m.Seen) <= s.cfg.MemberTTL {
			out = append(out, m)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out
}

// Alive reports whether node is a live member.
func (s *Store) Alive(node string) bool {
	for _, m := range s.Members() {
		if m.Node == node {
			return true
		}
	}
	return false
}

func leaseKey(kctx string, shard int) string { return "lease." + kctx + "." + strconv.Itoa(shard) }
func pinKey(kctx string, shard int) string   { return "pin." + kctx + "." + strconv.Itoa(shard) }

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

// Desired is where a shard should live: its pin when the pinned node is a
// live, non-draining member that does not refuse the shard, else such a
// member with the highest rendezvous score. "" when there is no candidate.
func (s *Store) Desired(kctx string, shard int, members []Member) string {
	names := make([]string, 0, len(members))
	for _, m := range members {
		if !m.Draining && m.Serves(kctx) && !m.Refused(kctx, shard) {
			names = append(names, m.Node)
		}
	}
	if pin := s.Pin(kctx, shard); pin != "" {
		for _, n := range names {
			if n == pin {
				return pin
			}
		}
	}
	return Rendezvous(kctx, shard, names)
}

// Rendezvous returns the node with the highest hash of (node, context,
// shard): when a node joins, only the shards it now wins move to it (about
// 1/N), and when one leaves only its own shards move.
func Rendezvous(kctx string, shard int, nodes []string) string {
	var best string
	var bestScore uint64
	key := "/" + kctx + "/" + strconv.Itoa(shard)
	for _, n := range nodes {
		score := xxhash.Sum64String(n + key)
		if best == "" || score > bestScore || (score == bestScore && n < best) {
			best, bestScore = n, score
		}
	}
	return best
}
