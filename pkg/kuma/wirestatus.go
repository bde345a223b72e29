package kuma

import "time"

// StatusReply answers kuma.<ctx>.status. Any shardnode may answer; its
// answer covers the whole cluster: every shard from the leases, every live
// member, and each shard's counts as its owner reports them.
type StatusReply struct {
	Context     string             `json:"context"`
	AnsweredBy  string             `json:"answered_by,omitempty"` // the node that built this answer
	Shards      []ShardStatus      `json:"shards"`
	Nodes       []NodeStatus       `json:"nodes"`
	Moves       []ShardMove        `json:"moves"`
	Projections []ProjectionStatus `json:"projections"`
}

// ShardStatus is one shard's line in the shard map. Owner, Epoch,
// HandoffTo, Desired and Pinned come from the cluster's leases and pins;
// the counts come from the owner, and are zero with Error set when the
// owner did not answer in time.
type ShardStatus struct {
	Shard      int    `json:"shard"`
	Owner      string `json:"owner"`                // "" while the shard is released (between two owners)
	Epoch      int64  `json:"epoch,omitempty"`      // the lease's epoch; rises by one with each new owner
	Moving     string `json:"moving,omitempty"`     // what is under way ("n1: handing off to n2"); "" when still
	HandoffTo  string `json:"handoff_to,omitempty"` // a released lease names its next owner
	Desired    string `json:"desired,omitempty"`    // where the shard should live (pin, else rendezvous hashing)
	Pinned     string `json:"pinned,omitempty"`     // the node an operator pinned it to (kuma migrate)
	Entities   int64  `json:"entities"`
	Events     int64  `json:"events"` // events committed (the last position's sequence)
	Position   string `json:"position,omitempty"`
	Published  string `json:"published,omitempty"` // last position in the event stream
	RelayLag   int64  `json:"relay_lag"`           // events committed but not yet in the stream
	LiveActors int    `json:"live_actors"`
	Error      string `json:"error,omitempty"` // why the counts are missing ("unavailable")
}

// NodeStatus is one live node (a member of the cluster).
type NodeStatus struct {
	Name     string    `json:"name"`
	Shards   int       `json:"shards"` // shards whose lease it holds
	Draining bool      `json:"draining,omitempty"`
	Started  time.Time `json:"started"`
	Error    string    `json:"error,omitempty"` // "unavailable": it did not answer in time
}

// ShardMove is a shard in motion on a node: a hand-off, a take-over or a
// snapshot upload.
type ShardMove struct {
	Node string `json:"node"`
	// Context is set where moves of several contexts are listed together
	// (a node's own list); a context's status leaves it out.
	Context string `json:"context,omitempty"`
	Shard   int    `json:"shard"`
	What    string `json:"what"`
}

// MigrateSubject is the admin subject that pins a shard to a node:
// kuma.<ctx>.shard.migrate.
func MigrateSubject(ctx string) string { return PublicPrefix + "." + ctx + ".shard.migrate" }

// MigrateRequest is the body of kuma.<ctx>.shard.migrate: either To (pin the
// shard to that node, which moves it there) or Unpin (give the shard back to
// rendezvous hashing).
type MigrateRequest struct {
	Shard *int   `json:"shard"`
	To    string `json:"to,omitempty"`
	Unpin bool   `json:"unpin,omitempty"`
}

func (*MigrateRequest) fields() fieldSet { return fieldSet{top: []string{"shard", "to", "unpin"}} }

// MigrateReply answers a migrate: the pin now in force (To; after an unpin,
// the node rendezvous hashing picks) and the shard's owner and epoch at the
// time of the answer. The move itself follows within the nodes' next
// control tick; status shows when it is done.
type MigrateReply struct {
	Shard  int    `json:"shard"`
	To     string `json:"to"`
	Pinned bool   `json:"pinned"`
	Owner  string `json:"owner"`
	Epoch  int64  `json:"epoch"`
}
