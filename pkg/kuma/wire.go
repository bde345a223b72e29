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
	// checked: Decode checked Data as JSON (Event passes it on).
	checked bool
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
	if a, ok := v.(*AppendRequest); ok {
		if decodeAppendFast(body, a) != nil {
			if err := decodeGeneral(body, v); err != nil {
				return err
			}
		}
		// Either path checked every event's data as JSON (the direct
		// one as it read it, encoding/json for a json.RawMessage): the
		// fold need not check it again.
		for i := range a.Events {
			a.Events[i].checked = true
		}
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
