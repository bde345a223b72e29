package kuma

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"time"
	"unicode/utf8"
)

// EventInput is one event of an append request.
type EventInput struct {
	Type string `json:"type"`
	// Data is any JSON value; an absent data is stored as {} so that an event
	// that only names a fact leaves the merge-patch state as it was.
	Data json.RawMessage `json:"data,omitempty"`
}

// AppendRequest is the body of kuma.<ctx>.append.<entity>.
type AppendRequest struct {
	Events []EventInput `json:"events"`
	// ExpectedVersion: nil = any, 0 = must not exist, N = must be at N.
	ExpectedVersion *int64 `json:"expected_version,omitempty"`
	IdempotencyKey  string `json:"idempotency_key,omitempty"`
}

// AppendReply answers an append.
type AppendReply struct {
	Entity       string    `json:"entity"`
	FirstVersion int64     `json:"first_version"`
	LastVersion  int64     `json:"last_version"`
	Time         time.Time `json:"time"`
	Position     string    `json:"position"`
	Duplicate    bool      `json:"duplicate,omitempty"`
}

// ReadRequest is the body of kuma.<ctx>.read.<entity>; both fields absent reads now.
type ReadRequest struct {
	AtVersion *int64     `json:"at_version,omitempty"`
	AtTime    *time.Time `json:"at_time,omitempty"`
}

// ReadReply answers a read.
type ReadReply struct {
	Entity    string          `json:"entity"`
	Version   int64           `json:"version"`
	State     json.RawMessage `json:"state"`
	CreatedAt time.Time       `json:"created_at"`
	UpdatedAt time.Time       `json:"updated_at"`
}

// HistoryRequest is the body of kuma.<ctx>.history.<entity>.
type HistoryRequest struct {
	FromVersion int64 `json:"from_version,omitempty"`
	Limit       int   `json:"limit,omitempty"`
}

// History paging limits.
const (
	DefaultHistoryLimit = 100
	MaxHistoryLimit     = 1000
)

// RecordedEvent is an event as stored: what history and export return.
type RecordedEvent struct {
	Version int64           `json:"version"`
	Type    string          `json:"type"`
	Data    json.RawMessage `json:"data"`
	Time    time.Time       `json:"time"`
}

// HistoryReply answers a history request. NextVersion is nil at the end.
type HistoryReply struct {
	Entity      string          `json:"entity"`
	Events      []RecordedEvent `json:"events"`
	NextVersion *int64          `json:"next_version"`
}

// ExportReply is everything Kuma holds about one entity.
type ExportReply struct {
	Entity     string          `json:"entity"`
	Version    int64           `json:"version"`
	State      json.RawMessage `json:"state"`
	Events     []RecordedEvent `json:"events"`
	ExportedAt time.Time       `json:"exported_at"`
}

// ErrorReply is the JSON body of an error reply.
type ErrorReply struct {
	Error *Error `json:"error"`
}

// Limits are the per-context request limits. The zero value means the defaults.
type Limits struct {
	MaxEventBytes int // size of one event's data, default 64 KiB
	MaxBatch      int // events per append, default 1,000
}

// Default limits from PROTOCOL.md.
const (
	DefaultMaxEventBytes = 64 << 10
	DefaultMaxBatch      = 1000
)

// WithDefaults fills zero fields with the protocol defaults.
func (l Limits) WithDefaults() Limits {
	if l.MaxEventBytes <= 0 {
		l.MaxEventBytes = DefaultMaxEventBytes
	}
	if l.MaxBatch <= 0 {
		l.MaxBatch = DefaultMaxBatch
	}
	return l
}

var emptyObject = json.RawMessage(`{}`)

// Validate checks an append against the limits and the naming rules and fills
// absent data with {}. It reports the first problem with its index so that a
// client can find the offending event in a large batch.
func (r *AppendRequest) Validate(l Limits) error {
	l = l.WithDefaults()
	if len(r.Events) == 0 {
		return Errorf(CodeBadRequest, "events must hold 1 to %d events, got none", l.MaxBatch)
	}
	// PROTOCOL.md lists a bad batch size under bad_request; payload_too_large
	// is for bytes over a limit.
	if len(r.Events) > l.MaxBatch {
		return &Error{Code: CodeBadRequest,
			Message: fmt.Sprintf("events must hold 1 to %d events, got %d", l.MaxBatch, len(r.Events)),
			Details: map[string]any{"max_batch": l.MaxBatch}}
	}
	if r.ExpectedVersion != nil && *r.ExpectedVersion < 0 {
		return Errorf(CodeBadRequest, "expected_version must be 0 or more, got %d", *r.ExpectedVersion)
	}
	if n := utf8.RuneCountInString(r.IdempotencyKey); n > MaxIdempotencyKeyLen {
		return Errorf(CodeBadRequest, "idempotency_key must be at most %d characters, got %d", MaxIdempotencyKeyLen, n)
	}
	for i := range r.Events {
		ev := &r.Events[i]
		if err := ValidateEventType(ev.Type); err != nil {
			e := err.(*Error)
			e.Details = map[string]any{"index": i}
			return e
		}
		if len(ev.Data) > l.MaxEventBytes {
			return &Error{Code: CodePayloadTooLarge,
				Message: fmt.Sprintf("event %d: data is %d bytes, the limit is %d", i, len(ev.Data), l.MaxEventBytes),
				Details: map[string]any{"index": i, "max_event_bytes": l.MaxEventBytes}}
		}
		if len(ev.Data) == 0 {
			ev.Data = emptyObject
		}
	}
	return nil
}

// Validate checks a read request.
func (r *ReadRequest) Validate() error {
	if r.AtVersion != nil && r.AtTime != nil {
		return Errorf(CodeBadRequest, "give at most one of at_version and at_time")
	}
	if r.AtVersion != nil && *r.AtVersion < 1 {
		return Errorf(CodeBadRequest, "at_version must be 1 or more, got %d", *r.AtVersion)
	}
	if r.AtTime != nil {
		return CheckTime("at_time", *r.AtTime)
	}
	return nil
}

// CheckTime refuses a time a request names outside what the store can
// compare: event times are nanoseconds since 1970 in an int64, which holds
// 1677-09-21T00:12:43Z to 2262-04-11T23:47:16Z. A time outside would wrap
// around (year 2263 would answer "did not exist yet"), so it is refused with
// bad_request rather than guessed at.
func CheckTime(field string, t time.Time) error {
	lo, hi := time.Unix(0, math.MinInt64).UTC(), time.Unix(0, math.MaxInt64).UTC()
	if t.Before(lo) || t.After(hi) {
		return &Error{Code: CodeBadRequest,
			Message: fmt.Sprintf("%s must be between %s and %s, got %s", field, lo.Format(time.RFC3339), hi.Format(time.RFC3339), t.Format(time.RFC3339Nano)),
			Details: map[string]any{"min": lo, "max": hi}}
	}
	return nil
}

// Validate checks a history request and fills its defaults.
func (r *HistoryRequest) Validate() error {
	if r.FromVersion < 0 {
		return Errorf(CodeBadRequest, "from_version must be 1 or more, got %d", r.FromVersion)
	}
	if r.FromVersion == 0 {
		r.FromVersion = 1
	}
	if r.Limit < 0 || r.Limit > MaxHistoryLimit {
		return Errorf(CodeBadRequest, "limit must be 1 to %d, got %d", MaxHistoryLimit, r.Limit)
	}
	if r.Limit == 0 {
		r.Limit = DefaultHistoryLimit
	}
	return nil
}

// Decode reads a JSON request body strictly: unknown fields, trailing data,
// malformed JSON, bytes that are not UTF-8, duplicate keys, lone surrogate
// escapes and numbers beyond a double are bad_request (invalid_event when
// they are inside an event's data: see checkBody). An empty body decodes to
// the zero value, which is how "body empty" requests (read now) are spelled.
func Decode(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil
	}
	if a, ok := v.(*AppendRequest); ok && decodeAppendFast(body, a) == nil {
		return nil
	}
	return decodeGeneral(body, v)
}

// DecodeEmpty checks the body of a request that has no fields (export,
// status, rebuild, retry): empty, or a JSON object with nothing in it.
// Anything else is bad_request, as for every other request body.
func DecodeEmpty(body []byte) error {
	var none struct{}
	return Decode(body, &none)
}

// decodeGeneral is Decode for any shape; the append fast path must never
// take what it refuses.
func decodeGeneral(body []byte, v any) error {
	if x, ok := v.(exactFields); ok {
		// The request types list their exact keys, which checkBody enforces
		// (unknown and wrongly cased keys alike), so the cheaper
		// json.Unmarshal will do; it refuses trailing data by itself.
		if err := json.Unmarshal(body, v); err != nil {
			return Errorf(CodeBadRequest, "malformed request: %s", describeJSONError(err))
		}
		fs := x.fields()
		_, isAppend := v.(*AppendRequest)
		return checkBody(body, &fs, isAppend)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return Errorf(CodeBadRequest, "malformed request: %s", describeJSONError(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return Errorf(CodeBadRequest, "malformed request: data after the JSON value")
	}
	return checkBody(body, nil, false)
}

func describeJSONError(err error) string {
	switch e := err.(type) {
	case *json.SyntaxError:
		return fmt.Sprintf("invalid JSON at byte %d: %s", e.Offset, e.Error())
	case *json.UnmarshalTypeError:
		if e.Field != "" {
			return fmt.Sprintf("field %q must be %s, not JSON %s", e.Field, e.Type, e.Value)
		}
		return fmt.Sprintf("expected a JSON object, not JSON %s", e.Value)
	}
	return truncate(err.Error())
}

// ForgetRequest is the body of kuma.<ctx>.forget.<entity>.
type ForgetRequest struct {
	Reason string `json:"reason,omitempty"`
}

func (*ForgetRequest) fields() fieldSet { return fieldSet{top: []string{"reason"}} }

// HeaderRequestedBy is the request header naming who asked for a forget, for
// the audit record. Without NATS authentication it is the caller's own claim.
const HeaderRequestedBy = "Kuma-Requested-By"

// MaxForgetReasonLen bounds the free-text reason kept in the audit log.
const MaxForgetReasonLen = 1024

// ForgetReply answers a forget; forgetting again answers the same.
type ForgetReply struct {
	Entity        string    `json:"entity"`
	ForgottenAt   time.Time `json:"forgotten_at"`
	EventsDeleted int64     `json:"events_deleted"`
}

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
