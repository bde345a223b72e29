package kuma

import (
	"encoding/json"
	"time"
)

// ProjectionStatus is one projection's progress. Positions holds, per shard,
// the last position it applied; Lag is the number of stream messages it has
// yet to apply. A projection that failed on an event is "stopped" with the
// error and that event's position until an operator retries or skips it.
type ProjectionStatus struct {
	Name       string            `json:"name"`
	Node       string            `json:"node,omitempty"`
	State      string            `json:"state"` // running, stopped, retrying
	Generation int64             `json:"generation"`
	Position   string            `json:"position,omitempty"`
	Positions  map[string]string `json:"positions"`
	Applied    uint64            `json:"applied_stream_seq"`
	Lag        int64             `json:"lag"`
	Error      *ProjectionError  `json:"error,omitempty"`
	Rebuild    *RebuildStatus    `json:"rebuild,omitempty"`
	Skipped    int64             `json:"skipped"`
	// Replicas is every projector replica's own status of this
	// projection, in node order, when the answering projector gathered
	// them: each applies the whole stream into its own read model. A
	// replica that holds a durable consumer on the stream but did not
	// answer is listed with State "unavailable" and the lag of that
	// consumer. The fields above are those of the replica furthest
	// behind (stopped before retrying before rebuilding before lagging),
	// so that a reader of one status sees the worst a query may meet.
	Replicas []ProjectionStatus `json:"replicas,omitempty"`
}

// ReplicaResult is what one projector replica made of an admin command
// (rebuild, retry, skip) that the projector receiving it passed to every
// replica: Error is nil when it applied it. Generation and Started are a
// rebuild's.
type ReplicaResult struct {
	Node       string `json:"node"`
	Applied    bool   `json:"applied"`
	Generation int64  `json:"generation,omitempty"`
	Started    *bool  `json:"started,omitempty"`
	// Removed names what a drop removed on the replica: its read model
	// files and its durable consumers.
	Removed []string `json:"removed,omitempty"`
	Error   *Error   `json:"error,omitempty"`
}

// ReplicaFanout is the part of an admin reply that says which replicas
// applied the command (Replicas, in node order, failures included) and
// which replicas known to the stream did not answer in time (Missing).
type ReplicaFanout struct {
	Replicas []ReplicaResult `json:"replicas,omitempty"`
	Missing  []string        `json:"missing,omitempty"`
}

// ProjectionError is why a projection stopped (or is retrying).
type ProjectionError struct {
	Position  string    `json:"position,omitempty"`
	EventType string    `json:"event_type,omitempty"`
	Entity    string    `json:"entity,omitempty"`
	Message   string    `json:"message"`
	Since     time.Time `json:"since"`
}

// RebuildStatus is the progress of a rebuild: a fresh copy built beside the
// live one, which answers queries until the copy has caught up.
type RebuildStatus struct {
	Generation int64            `json:"generation"`
	Applied    uint64           `json:"applied_stream_seq"`
	Target     uint64           `json:"target_stream_seq"`
	Progress   float64          `json:"progress"` // 0 to 1
	State      string           `json:"state"`
	Error      *ProjectionError `json:"error,omitempty"`
	StartedAt  time.Time        `json:"started_at"`
}

// QueryRequest is the body of kuma.<ctx>.query.<projection>.
type QueryRequest struct {
	Query  string                     `json:"query,omitempty"`
	Params map[string]json.RawMessage `json:"params,omitempty"`
	Limit  int                        `json:"limit,omitempty"`
	Cursor string                     `json:"cursor,omitempty"`
	After  string                     `json:"after,omitempty"`
	WaitMS *int                       `json:"wait_ms,omitempty"`
}

// Query limits.
const (
	DefaultQueryLimit = 100
	MaxQueryLimit     = 1000
	DefaultQueryWait  = 2000 // ms
	MaxQueryWait      = 10000
)

// Validate checks the request and fills defaults; it returns the position to
// wait for (zero without after) and how long to wait for it.
func (r *QueryRequest) Validate() (Position, time.Duration, error) {
	switch {
	case r.Limit == 0:
		r.Limit = DefaultQueryLimit
	case r.Limit < 0 || r.Limit > MaxQueryLimit:
		return Position{}, 0, Errorf(CodeBadRequest, "limit must be 1 to %d", MaxQueryLimit)
	}
	wait := DefaultQueryWait
	if r.WaitMS != nil {
		if *r.WaitMS < 0 || *r.WaitMS > MaxQueryWait {
			return Position{}, 0, Errorf(CodeBadRequest, "wait_ms must be 0 to %d", MaxQueryWait)
		}
		wait = *r.WaitMS
	}
	if r.After == "" {
		return Position{}, 0, nil
	}
	p, err := ParsePosition(r.After)
	if err != nil {
		return Position{}, 0, err
	}
	return p, time.Duration(wait) * time.Millisecond, nil
}

// QueryReply answers a query. Position is the last position the projection
// had applied when the rows were read; NextCursor is empty on the last page.
type QueryReply struct {
	Rows       []map[string]any `json:"rows"`
	NextCursor string           `json:"next_cursor,omitempty"`
	Position   string           `json:"position,omitempty"`
}

// EntityRow is a row of the built-in entities projection.
type EntityRow struct {
	Entity    string          `json:"entity"`
	Version   int64           `json:"version"`
	State     json.RawMessage `json:"state"`
	UpdatedAt time.Time       `json:"updated_at"`
}

// RebuildReply answers kuma.<ctx>.projection.rebuild.<name> at once.
// With several projector replicas, Generation and Started are those of the
// replica that received the request (or the first that applied it) and
// ReplicaFanout says what every replica did.
type RebuildReply struct {
	Projection string `json:"projection"`
	Generation int64  `json:"generation"`
	Started    bool   `json:"started"` // false: a rebuild was already running
	ReplicaFanout
}

// ProjectionActReply answers kuma.<ctx>.projection.retry.<name> (Retrying)
// and kuma.<ctx>.projection.skip.<name> (Skipped, the position skipped).
type ProjectionActReply struct {
	Projection string `json:"projection"`
	Retrying   bool   `json:"retrying,omitempty"`
	Skipped    string `json:"skipped,omitempty"`
	// Dropped: a projection no longer declared had its read model files
	// and durable consumers removed (projection.drop).
	Dropped bool `json:"dropped,omitempty"`
	ReplicaFanout
}

// SkipRequest is the body of kuma.<ctx>.projection.skip.<name>: the position
// of the event the projection stopped at, so that an operator skips exactly
// the event they looked at.
type SkipRequest struct {
	Position string `json:"position"`
}
