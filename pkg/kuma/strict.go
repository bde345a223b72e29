package kuma

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// encoding/json matches object keys to struct fields ignoring case, even with
// DisallowUnknownFields, so {"LIMIT": 5} would pass for "limit" and
// {"expected_version":1,"Expected_Version":5} would silently become 5. It
// also keeps the last of two equal keys, keeps bytes that are not UTF-8 in a
// RawMessage (and turns them into U+FFFD in a string), reads a lone
// surrogate escape as U+FFFD and stores 1e400 in a RawMessage as written.
// What it stores would then come back, in read, history, export and the
// read models, as JSON that strict parsers in other languages refuse or read
// differently. checkBody walks the body once more and refuses all of it.

// fieldSet names the exact keys a request type accepts: its top-level keys,
// and for top-level keys holding an array of objects, those objects' keys.
type fieldSet struct {
	top    []string
	arrays map[string][]string
	// nonZero holds the top-level numbers whose range starts at 1 and
	// whose zero value (omitted) means the default: a 0 written out is
	// out of range, and refused with the message given, instead of being
	// read as the default as encoding/json would.
	nonZero map[string]string
}

// exactFields is implemented by the request types that Decode checks.
type exactFields interface{ fields() fieldSet }

func (*AppendRequest) fields() fieldSet {
	return fieldSet{
		top:    []string{"events", "expected_version", "idempotency_key"},
		arrays: map[string][]string{"events": {"type", "data"}},
	}
}
func (*QueryRequest) fields() fieldSet {
	return fieldSet{top: []string{"query", "params", "limit", "cursor", "after", "wait_ms"}}
}
func (*SkipRequest) fields() fieldSet    { return fieldSet{top: []string{"position"}} }
func (*ReadRequest) fields() fieldSet    { return fieldSet{top: []string{"at_version", "at_time"}} }
func (*HistoryRequest) fields() fieldSet { return fieldSet{top: []string{"from_version", "limit"}} }

// checkBody walks a body that encoding/json has already accepted as JSON
// (so its syntax is known good) and refuses:
//   - a key that is not one of fs's, spelled exactly (fs nil: any key);
//   - bytes that are not UTF-8 (RFC 8259 §8.1: JSON text is UTF-8);
//   - a \u escape of a lone surrogate;
//   - a key that appears twice in one object, at any depth;
//   - a number beyond a double's range (|x| > 1.8e308).
//
// A problem inside an append's events[i].data is invalid_event naming i
// (the data breaks the event rules); anything else is bad_request.
func checkBody(body []byte, fs *fieldSet, isAppend bool) error {
	w := &bodyWalker{b: body, event: -1}
	w.ws()
	if fs == nil || w.peek() != '{' {
		return w.value()
	}
	w.i++
	return w.object(fs.top, func(key []byte) error {
		if msg, ok := fs.nonZero[string(key)]; ok {
			start := w.i
			if err := w.value(); err != nil {
				return err
			}
			if zeroNumber(w.b[start:w.i]) {
				return Errorf(CodeBadRequest, "%s", msg)
			}
			return nil
		}
		inner, ok := fs.arrays[string(key)]
		if !ok || w.peek() != '[' {
			return w.value()
		}
		w.i++
		idx := 0
		return w.members(']', func() error {
			defer func() { idx++ }()
			w.ws()
			if w.peek() != '{' {
				return w.value()
			}
			w.i++
			return w.object(inner, func(k []byte) error {
				if !isAppend || string(k) != "data" {
					return w.value()
				}
				w.event = idx
				err := w.value()
				w.event = -1
				return err
			})
		})
	})
}

type bodyWalker struct {
	b     []byte
	i     int
	event int      // the index of the event whose data is being walked, else -1
	keys  [][]byte // the keys of the objects open, innermost last
}

// errNotUTF8 is always bad_request: such a body is not JSON text at all.
var errNotUTF8 = errors.New("not UTF-8")

func (w *bodyWalker) fail(err error, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if w.event >= 0 && err != errNotUTF8 {
		return &Error{Code: CodeInvalidEvent, Message: fmt.Sprintf("event %d: in data, %s", w.event, msg),
			Details: map[string]any{"index": w.event}}
	}
	return Errorf(CodeBadRequest, "malformed request: %s", msg)
}

func (w *bodyWalker) peek() byte {
	if w.i < len(w.b) {
		return w.b[w.i]
	}
	return 0
}

func (w *bodyWalker) ws() {
	for w.i < len(w.b) {
		switch w.b[w.i] {
		case ' ', '\t', '\n', '\r':
			w.i++
		default:
			return
		}
	}
}

func (w *bodyWalker) value() error {
	w.ws()
	switch c := w.peek(); {
	case c == '{':
		w.i++
		return w.object(nil, func([]byte) error { return w.value() })
	case c == '[':
		w.i++
		return w.members(']', w.value)
	case c == '"':
		_, err := w.str()
		return err
	case c == '-' || ('0' <= c && c <= '9'):
		return w.number()
	default: // true, false, null
		for w.i < len(w.b) && 'a' <= w.b[w.i] && w.b[w.i] <= 'z' {
			w.i++
		}
		return nil
	}
}

// members walks the rest of an array or object (its opening bracket read).
func (w *bodyWalker) members(close byte, each func() error) error {
	w.ws()
	if w.peek() == close {
		w.i++
		return nil
	}
	for {
		if err := each(); err != nil {
			return err
		}
		w.ws()
		c := w.peek()
		w.i++
		if c == close {
			return nil
		}
	}
}

// object walks the rest of an object: each key is checked against allowed
// (nil: any) and against the object's other keys, then val walks its value.
func (w *bodyWalker) object(allowed []string, val func(key []byte) error) error {
	base := len(w.keys)
	defer func() { w.keys = w.keys[:base] }()
	var seen map[string]struct{} // for objects with many keys
	return w.members('}', func() error {
		w.ws()
		key, err := w.str()
		if err != nil {
			return err
		}
		if allowed != nil && !contains(allowed, key) {
			return Errorf(CodeBadRequest, "malformed request: unknown field %q (field names are exact: %v)", truncate(string(key)), allowed)
		}
		dup := false
		if mine := w.keys[base:]; len(mine) < 16 {
			for _, k := range mine {
				dup = dup || string(k) == string(key)
			}
		} else {
			if seen == nil {
				seen = make(map[string]struct{}, 2*len(mine))
				for _, k := range mine {
					seen[string(k)] = struct{}{}
				}
			}
			_, dup = seen[string(key)]
			seen[string(key)] = struct{}{}
		}
		if dup {
			return w.fail(nil, "the key %q appears twice in one object (strict JSON parsers refuse duplicate keys; encoding/json would keep the last)", truncate(string(key)))
		}
		w.keys = append(w.keys, key)
		w.ws()
		w.i++ // the colon
		w.ws()
		return val(key)
	})
}

// str walks a string from its opening quote and returns its text: the raw
// bytes when it has no escape (no allocation), else the decoded text.
func (w *bodyWalker) str() ([]byte, error) {
	w.i++
	start, escaped := w.i, false
	for w.i < len(w.b) {
		c := w.b[w.i]
		switch {
		case c == '"':
			raw := w.b[start:w.i]
			w.i++
			if !escaped {
				return raw, nil
			}
			var s string
			if err := json.Unmarshal(w.b[start-1:w.i], &s); err != nil {
				return nil, w.fail(nil, "a string is malformed: %v", err)
			}
			return []byte(s), nil
		case c == '\\':
			escaped = true
			if w.i+1 < len(w.b) && w.b[w.i+1] == 'u' {
				if err := w.unicodeEscape(); err != nil {
					return nil, err
				}
				continue
			}
			w.i += 2
		case c >= utf8.RuneSelf:
			r, n := utf8.DecodeRune(w.b[w.i:])
			if r == utf8.RuneError && n <= 1 {
				return nil, w.fail(errNotUTF8, "the body is not valid UTF-8 (byte %d)", w.i)
			}
			w.i += n
		default:
			w.i++
		}
	}
	return nil, w.fail(nil, "a string is not terminated")
}

// unicodeEscape walks a \uXXXX escape (w.i at its backslash) and, for a
// surrogate, the \uXXXX of its other half, which must follow.
func (w *bodyWalker) unicodeEscape() error {
	hi, ok := w.hex4(w.i + 2)
	if !ok {
		return w.fail(nil, "a \\u escape is malformed at byte %d", w.i)
	}
	at := w.i
	w.i += 6
	switch {
	case hi < 0xd800 || hi > 0xdfff:
		return nil
	case hi <= 0xdbff && w.i+1 < len(w.b) && w.b[w.i] == '\\' && w.b[w.i+1] == 'u':
		if lo, ok := w.hex4(w.i + 2); ok && lo >= 0xdc00 && lo <= 0xdfff {
			w.i += 6
			return nil
		}
	}
	return w.fail(nil, "there is a lone surrogate escape \\u%04x at byte %d (it is no character; strict parsers refuse it)", hi, at)
}

func (w *bodyWalker) hex4(at int) (rune, bool) {
	if at+4 > len(w.b) {
		return 0, false
	}
	v, err := strconv.ParseUint(string(w.b[at:at+4]), 16, 32)
	return rune(v), err == nil
}

// number walks a number and refuses one beyond a double's range, which
// strict parsers refuse or read as infinity. Below the range (1e-400)
// every parser reads 0, which is left as written.
func (w *bodyWalker) number() error {
	start, exp := w.i, false
	for w.i < len(w.b) {
		c := w.b[w.i]
		if c == 'e' || c == 'E' {
			exp = true
		} else if !('0' <= c && c <= '9' || c == '-' || c == '+' || c == '.') {
			break
		}
		w.i++
	}
	if !exp && w.i-start < 300 {
		return nil
	}
	if _, err := strconv.ParseFloat(string(w.b[start:w.i]), 64); err != nil {
		return w.fail(nil, "the number %s is beyond the range of a 64-bit float (about ±1.8e308)", truncate(string(w.b[start:w.i])))
	}
	return nil
}

func contains(list []string, b []byte) bool {
	for _, x := range list {
		if x == string(b) { // no allocation: the compiler compares in place
			return true
		}
	}
	return false
}

// zeroNumber tells whether a JSON value is a number equal to zero (0, -0,
// 0.0, 0e5).
func zeroNumber(v []byte) bool {
	if len(v) == 0 || (v[0] != '-' && (v[0] < '0' || v[0] > '9')) {
		return false
	}
	f, err := strconv.ParseFloat(string(v), 64)
	return err == nil && f == 0
}
