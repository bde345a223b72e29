package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"time"

	"github.com/cespare/xxhash/v2"
)

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
	// StreamFormats are the event stream message formats the node's
	// processes read (kuma.StreamFormats). Empty: format 1 alone (a node
	// from before format 2). Relays write format 2 only while every live
	// member reads it (services/shardnode, the stream format gate).
	StreamFormats []int `json:"stream_formats,omitempty"`
	// Seen is the server's time of the last heartbeat (not stored).
	Seen time.Time `json:"-"`
}

// Serves reports whether the member serves context kctx.
func (m Member) Serves(kctx string) bool {
	return len(m.Contexts) == 0 || slices.Contains(m.Contexts, kctx)
}

// ReadsStreamFormat reports whether the member reads stream messages of
// format f.
func (m Member) ReadsStreamFormat(f int) bool {
	if len(m.StreamFormats) == 0 {
		return f == 1
	}
	return slices.Contains(m.StreamFormats, f)
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
