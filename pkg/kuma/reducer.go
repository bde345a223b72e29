package kuma

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Event is an event handed to a reducer.
type Event struct {
	Entity  string
	Version int64
	Type    string
	Data    json.RawMessage
	Time    time.Time
}

// Reducer folds events into an entity's state. Fold must be pure: it returns
// the state after applying events in order to state (nil for an entity with no
// events yet) and must not modify its arguments. The shardnode calls it before
// a batch is committed, so an error refuses the whole append with
// invalid_event and stores nothing. It is called from many goroutines at once.
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
	if isObject(v) {
		d.val = nil
		d.obj = map[string]json.RawMessage{}
		return json.Unmarshal(v, &d.obj)
	}
	if !json.Valid(v) {
		return errors.New("invalid JSON")
	}
	d.obj, d.val = nil, v
	return nil
}

// apply is RFC 7386 section 2 applied to d.
func (d *rawDoc) apply(patch json.RawMessage) error {
	if !isObject(patch) {
		return d.set(patch)
	}
	var p map[string]json.RawMessage
	if err := json.Unmarshal(patch, &p); err != nil {
		return err
	}
	if d.obj == nil {
		d.obj, d.val = make(map[string]json.RawMessage, len(p)), nil
	}
	for k, v := range p {
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
	}
	return nil
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

// mergeRaw merges an object patch into a target value (absent, object or not).
func mergeRaw(target, patch json.RawMessage) (json.RawMessage, error) {
	var d rawDoc
	if isObject(target) {
		if err := d.set(target); err != nil {
			return nil, err
		}
	}
	if err := d.apply(patch); err != nil {
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
