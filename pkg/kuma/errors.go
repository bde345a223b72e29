package kuma

import (
	"errors"
	"fmt"
)

// Code is a protocol error code (PROTOCOL.md, "Errors").
type Code string

// The protocol's error codes.
const (
	CodeBadRequest      Code = "bad_request"
	CodeInvalidEntityID Code = "invalid_entity_id"
	CodeInvalidEvent    Code = "invalid_event"
	CodeForbidden       Code = "forbidden"
	CodeNotFound        Code = "not_found"
	CodeVersionConflict Code = "version_conflict"
	CodeEntityForgotten Code = "entity_forgotten"
	CodePayloadTooLarge Code = "payload_too_large"
	CodeUnavailable     Code = "unavailable"
	CodeTimeout         Code = "timeout"
	CodeInternal        Code = "internal"
)

// codeStatus is the one table from codes to the HTTP-like numbers carried in
// the Nats-Service-Error-Code header.
var codeStatus = map[Code]int{
	CodeBadRequest:      400,
	CodeInvalidEntityID: 400,
	CodeInvalidEvent:    400,
	CodeForbidden:       403,
	CodeNotFound:        404,
	CodeVersionConflict: 409,
	CodeEntityForgotten: 410,
	CodePayloadTooLarge: 413,
	CodeUnavailable:     503,
	CodeTimeout:         504,
	CodeInternal:        500,
}

// Status returns the HTTP-like number of a code; unknown codes are 500.
func (c Code) Status() int {
	if n, ok := codeStatus[c]; ok {
		return n
	}
	return 500
}

// CodeForStatus is the reverse of Status, for an error reply that carries
// only the header's number (a NATS micro service that is not Kuma's): the
// general code of that number, internal for a number no code has.
func CodeForStatus(n int) Code {
	if n == 400 { // three codes share it; bad_request is the general one
		return CodeBadRequest
	}
	for c, s := range codeStatus {
		if s == n {
			return c
		}
	}
	return CodeInternal
}

// Known reports whether c is one of the protocol's codes.
func (c Code) Known() bool { _, ok := codeStatus[c]; return ok }

// Error is a protocol error. It is what crosses the wire in an error reply and
// what the Go client returns, so `errors.Is(err, kuma.ErrVersionConflict)` and
// `errors.As(err, &kerr)` work on both sides.
type Error struct {
	Code    Code           `json:"code"`
	Message string         `json:"message"`
	Details map[string]any `json:"details,omitempty"`
}

func (e *Error) Error() string {
	if e.Message == "" {
		return string(e.Code)
	}
	return string(e.Code) + ": " + e.Message
}

// Is matches any *Error with the same code, so the sentinels below compare by
// code whatever the message.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t != nil && t.Code == e.Code
}

// ActualVersion returns the entity's version carried by a version_conflict.
func (e *Error) ActualVersion() (int64, bool) {
	if e.Code != CodeVersionConflict || e.Details == nil {
		return 0, false
	}
	switch v := e.Details["actual_version"].(type) {
	case int64:
		return v, true
	case float64: // decoded from JSON
		return int64(v), true
	case int:
		return int64(v), true
	}
	return 0, false
}

// Sentinels for errors.Is.
var (
	ErrBadRequest      = &Error{Code: CodeBadRequest}
	ErrInvalidEntityID = &Error{Code: CodeInvalidEntityID}
	ErrInvalidEvent    = &Error{Code: CodeInvalidEvent}
	ErrForbidden       = &Error{Code: CodeForbidden}
	ErrNotFound        = &Error{Code: CodeNotFound}
	ErrVersionConflict = &Error{Code: CodeVersionConflict}
	ErrEntityForgotten = &Error{Code: CodeEntityForgotten}
	ErrPayloadTooLarge = &Error{Code: CodePayloadTooLarge}
	ErrUnavailable     = &Error{Code: CodeUnavailable}
	ErrTimeout         = &Error{Code: CodeTimeout}
	ErrInternal        = &Error{Code: CodeInternal}
)

// Errorf builds an *Error with a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// VersionConflict is the error for an expected_version that did not match.
func VersionConflict(expected, actual int64) *Error {
	return &Error{
		Code:    CodeVersionConflict,
		Message: fmt.Sprintf("expected version %d, entity is at version %d", expected, actual),
		Details: map[string]any{"actual_version": actual},
	}
}

// AsError returns err as a protocol error. Anything that is not already one is
// internal, and its text is not exposed: internals never leak to clients.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: CodeInternal, Message: "internal error"}
}

// ErrorCode returns the protocol code of err, or "" when err is nil.
func ErrorCode(err error) Code {
	if err == nil {
		return ""
	}
	return AsError(err).Code
}
