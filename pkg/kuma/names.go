package kuma

import "fmt"

// DefaultContext is the context used when none is named.
const DefaultContext = "default"

// Name limits from PROTOCOL.md.
const (
	maxContextLen   = 32
	maxEntityIDLen  = 128
	maxEventTypeLen = 128
	// MaxIdempotencyKeyLen is the longest idempotency key an append may carry.
	MaxIdempotencyKeyLen = 128
)

// The rules below are written out by hand rather than as regular expressions:
// they run for every request on the hot path and a byte loop is an order of
// magnitude cheaper than regexp.

func isLower(c byte) bool { return c >= 'a' && c <= 'z' }
func isUpper(c byte) bool { return c >= 'A' && c <= 'Z' }
func isDigit(c byte) bool { return c >= '0' && c <= '9' }
func isAlnum(c byte) bool { return isLower(c) || isUpper(c) || isDigit(c) }

// ValidateContext checks a context name against ^[a-z0-9][a-z0-9_-]{0,31}$.
func ValidateContext(name string) error {
	if len(name) == 0 || len(name) > maxContextLen {
		return Errorf(CodeBadRequest, "context name %q must be 1 to %d characters", truncate(name), maxContextLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := isLower(c) || isDigit(c) || (i > 0 && (c == '_' || c == '-'))
		if !ok {
			return Errorf(CodeBadRequest, "context name %q must match ^[a-z0-9][a-z0-9_-]{0,31}$", name)
		}
	}
	return nil
}

// ValidateEntityID checks an entity id against ^[A-Za-z0-9][A-Za-z0-9_:=@-]{0,127}$,
// which keeps it a single NATS subject token.
func ValidateEntityID(id string) error {
	if len(id) == 0 || len(id) > maxEntityIDLen {
		return &Error{Code: CodeInvalidEntityID,
			Message: fmt.Sprintf("entity id must be 1 to %d characters, got %d", maxEntityIDLen, len(id))}
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		ok := isAlnum(c) || (i > 0 && (c == '_' || c == ':' || c == '=' || c == '@' || c == '-'))
		if !ok {
			return &Error{Code: CodeInvalidEntityID,
				Message: fmt.Sprintf("entity id %q must match ^[A-Za-z0-9][A-Za-z0-9_:=@-]{0,127}$ (bad character at %d)", truncate(id), i)}
		}
	}
	return nil
}

// ValidateEventType checks an event type against ^[A-Za-z][A-Za-z0-9_.:-]{0,127}$.
func ValidateEventType(t string) error {
	if len(t) == 0 || len(t) > maxEventTypeLen {
		return &Error{Code: CodeInvalidEvent,
			Message: fmt.Sprintf("event type must be 1 to %d characters, got %d", maxEventTypeLen, len(t))}
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		ok := isUpper(c) || isLower(c) || (i > 0 && (isDigit(c) || c == '_' || c == '.' || c == ':' || c == '-'))
		if !ok {
			return &Error{Code: CodeInvalidEvent,
				Message: fmt.Sprintf("event type %q must match ^[A-Za-z][A-Za-z0-9_.:-]{0,127}$", truncate(t))}
		}
	}
	return nil
}

// truncate keeps hostile input from filling error messages and logs.
func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
