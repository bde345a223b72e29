package kuma

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unsafe"
)

// Event is an event handed to a reducer.
type Event struct {
	Entity  string
	Version int64
	Type    string
	Data    json.RawMessage
	Time    time.Time
	// checked says Data was checked as JSON when its append was decoded
	// (EventInput.Event): MergePatch then walks it without checking it a
	// second time. Only this package sets it; an Event made elsewhere is
	// checked by the fold.
	checked bool
}

// Event is the event in of an append, as a reducer gets it: the entity's
// version and time given, and what the decoder knew of its data kept.
func (in EventInput) Event(entity string, version int64, t time.Time) Event {
	return Event{Entity: entity, Version: version, Type: in.Type, Data: in.Data, Time: t, checked: in.checked}
}

// Reducer folds events into an entity's state. Fold must be pure: it returns
// the state after applying events in order to state (nil for an entity with no
// events yet) and must not modify its arguments. The shardnode calls it before
// a batch is committed, so an error refuses the whole append with
// invalid_event and stores nothing. It is called from many goroutines at once.
// The caller does not change the events' data while Fold runs, so a
// reducer may keep sub-slices of it until it returns (MergePatch does).
type Reducer interface {
	Fold(state json.RawMessage, events []Event) (json.RawMessage, error)
}

// ReducerFunc adapts a function to Reducer.
type ReducerFunc func(state json.RawMessage, events []Event) (json.RawMessage, error)

// Fold calls f.
func (f ReducerFunc) Fold(state json.RawMessage, events []Event) (json.RawMessage, error) {
	return f(state, events)
}

// MergePatch is the default reducer: each event's data is applied to the state
// as a JSON Merge Patch (RFC 7386).
type MergePatch struct{}

// Fold keeps the document as a map of raw JSON values: a member that a patch
// replaces is never decoded, only objects that merge into objects are, and
// the result is encoded once per batch. Numbers and strings therefore pass
// through byte for byte (no float64 rounding), and a batch of 100 events
// costs one decode per event and one encode.
func (MergePatch) Fold(state json.RawMessage, events []Event) (json.RawMessage, error) {
	var doc rawDoc
	if len(state) > 0 {
		if err := doc.set(state); err != nil {
			return nil, fmt.Errorf("merge patch: decode state: %w", err)
		}
	}
	for i := range events {
		if events[i].checked && isObject(events[i].Data) {
			if doc.obj == nil {
				doc.obj, doc.val = map[string]json.RawMessage{}, nil
			}
			if err := members(events[i].Data, doc.applyMember); err != nil {
				return nil, Errorf(CodeInvalidEvent, "event %d: data is not valid JSON", i)
			}
			continue
		}
		if err := doc.apply(events[i].Data); err != nil {
			return nil, Errorf(CodeInvalidEvent, "event %d: data is not valid JSON", i)
		}
	}
	return doc.encode()
}

// rawDoc is a JSON document: an object (obj != nil) or any other value (val).
type rawDoc struct {
	obj map[string]json.RawMessage
	val json.RawMessage
}

func (d *rawDoc) set(v json.RawMessage) error {
	if !json.Valid(v) {
		return errors.New("invalid JSON")
	}
	if isObject(v) {
		d.val = nil
		d.obj = map[string]json.RawMessage{}
		return members(v, func(k string, val []byte) error { d.obj[k] = val; return nil })
	}
	d.obj, d.val = nil, v
	return nil
}

// apply is RFC 7386 section 2 applied to d, for a patch nobody has checked
// yet (an event's data). An object patch is checked as it is applied, in
// one scan (applyChecked); one that scan leaves to encoding/json is checked
// whole and applied again from its first member. Applying the first
// members of a patch and then all of it is applying it once: every step
// the first pass took (delete, replace, merge into an object) the second
// takes again, in the same order, so the last step on each key, and on
// each key inside a merged object, is the whole patch's; a key no step
// touches keeps its value. A refused patch leaves d half-applied, which is
// why Fold drops d on an error.
func (d *rawDoc) apply(patch json.RawMessage) error {
	if !isObject(patch) {
		return d.set(patch)
	}
	if d.obj == nil {
		d.obj, d.val = map[string]json.RawMessage{}, nil
	}
	err := d.applyChecked(patch)
	if err != errNotFast {
		return err
	}
	if !json.Valid(patch) {
		return errors.New("invalid JSON")
	}
	return members(patch, d.applyMember)
}

// applyChecked applies the members of an object patch to d.obj, checking
// the patch with the append path's strict reader (fastReader) as it walks
// it. Event data was checked when its append was decoded, and checking it
// again here with json.Valid before walking it was 7 % of a node's CPU
// under the seed workload; the check stays (a Reducer is public, and Fold
// must refuse what is not JSON), but it is now the walk itself. It returns
// errNotFast for what that reader leaves to encoding/json: non-ASCII or
// control bytes in strings, deep nesting, a key written twice.
func (d *rawDoc) applyChecked(patch []byte) error {
	r := fastReader{b: patch}
	r.ws()
	if r.lit(`{`) != nil {
		return errNotFast
	}
	var keyBuf []byte
	err := r.members(`}`, func() error {
		if err := r.lit(`"`); err != nil {
			return err
		}
		start := r.i
		r.escaped = false
		if err := r.skipStr(); err != nil {
			return err
		}
		var key string
		if raw := patch[start : r.i-1]; r.escaped {
			keyBuf = unescape(keyBuf[:0], raw)
			key = string(keyBuf)
		} else if len(raw) > 0 {
			// The key's text, not a copy: the members' values are
			// sub-slices of the patch already, and d, which holds both,
			// lives only until Fold encodes it. Fold's callers do not
			// change event data while it runs (the Reducer contract).
			key = unsafe.String(&raw[0], len(raw))
		}
		r.ws()
		if err := r.lit(`:`); err != nil {
			return err
		}
		r.ws()
		vstart := r.i
		if err := r.value(1); err != nil {
			return err
		}
		return d.applyMember(key, patch[vstart:r.i:r.i])
	})
	if err != nil {
		return err
	}
	if r.ws(); r.i != len(patch) {
		return errNotFast
	}
	return nil
}

// applyMember is one member's step of RFC 7386 section 2, for a value
// already checked (it is part of a checked patch).
func (d *rawDoc) applyMember(k string, v []byte) error {
	switch {
	case isNull(v):
		delete(d.obj, k)
	case isObject(v):
		merged, err := mergeRaw(d.obj[k], v)
		if err != nil {
			return err
		}
		d.obj[k] = merged
	default:
		d.obj[k] = v
	}
	return nil
}

// members calls fn with each member of a JSON object, in order, without
// decoding the values: each is a sub-slice of obj. obj must be valid JSON
// (callers check with json.Valid, which is far cheaper than decoding).
func members(obj []byte, fn func(key string, val []byte) error) error {
	i := skipSpace(obj, 0)
	if i >= len(obj) || obj[i] != '{' {
		return errors.New("not a JSON object")
	}
	i++
	for {
		i = skipSpace(obj, i)
		if i < len(obj) && obj[i] == '}' {
			return nil
		}
		if i < len(obj) && obj[i] == ',' {
			i = skipSpace(obj, i+1)
		}
		end := stringEnd(obj, i)
		rawKey := obj[i:end]
		var key string
		if bytes.IndexByte(rawKey, '\\') >= 0 {
			// Its own variable: one whose address is taken lives on the
			// heap, and key is set on every member.
			var unescaped string
			if err := json.Unmarshal(rawKey, &unescaped); err != nil {
				return err
			}
			key = unescaped
		} else if len(rawKey) > 2 {
			// The key's text, not a copy, as in applyChecked: the values
			// are sub-slices of obj already, and the rawDoc holding both
			// lives only until Fold encodes it.
			key = unsafe.String(&rawKey[1], len(rawKey)-2)
		}
		i = skipSpace(obj, end)
		i = skipSpace(obj, i+1) // the colon
		vend := valueEnd(obj, i)
		if err := fn(key, obj[i:vend:vend]); err != nil {
			return err
		}
		i = vend
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index just past the JSON string starting at b[i].
func stringEnd(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return len(b)
}

// valueEnd returns the index just past the JSON value starting at b[i].
func valueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				j = stringEnd(b, j) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return len(b)
	}
	j := i
	for j < len(b) && b[j] != ',' && b[j] != '}' && b[j] != ']' && b[j] != ' ' && b[j] != '\t' && b[j] != '\n' && b[j] != '\r' {
		j++
	}
	return j
}

func (d *rawDoc) encode() (json.RawMessage, error) {
	if d.obj != nil {
		return json.Marshal(d.obj)
	}
	if d.val == nil {
		return json.RawMessage("null"), nil
	}
	return json.Marshal(d.val) // compacts
}

// mergeRaw merges an object patch into a target value (absent, object or
// not). Both are parts of documents already checked (the state Fold was
// given, a patch apply checked), so neither is checked again.
func mergeRaw(target, patch json.RawMessage) (json.RawMessage, error) {
	d := rawDoc{obj: map[string]json.RawMessage{}}
	if isObject(target) {
		if err := members(target, func(k string, v []byte) error { d.obj[k] = v; return nil }); err != nil {
			return nil, err
		}
	}
	if err := members(patch, d.applyMember); err != nil {
		return nil, err
	}
	return d.encode()
}

func firstByte(v json.RawMessage) byte {
	for _, c := range v {
		switch c {
		case ' ', '\t', '\n', '\r':
			continue
		}
		return c
	}
	return 0
}

func isObject(v json.RawMessage) bool { return firstByte(v) == '{' }

func isNull(v json.RawMessage) bool {
	return firstByte(v) == 'n' && string(bytes.TrimSpace(v)) == "null"
}
