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
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"time"
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
