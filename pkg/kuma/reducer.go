package kuma

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

// Fold decodes the state once, applies every patch and encodes once, so a
// batch of 100 events costs one round trip through encoding/json, not 100.
func (MergePatch) Fold(state json.RawMessage, events []Event) (json.RawMessage, error) {
	var doc any
	if len(state) > 0 {
		if err := decodeExact(state, &doc); err != nil {
			return nil, fmt.Errorf("merge patch: decode state: %w", err)
		}
	}
	for i := range events {
		var patch any
		if err := decodeExact(events[i].Data, &patch); err != nil {
			return nil, Errorf(CodeInvalidEvent, "event %d: data is not JSON", i)
		}
		doc = mergePatch(doc, patch)
	}
	return json.Marshal(doc)
}

// mergePatch is RFC 7386 section 2. It may reuse target's maps, which is safe
// because Fold owns the freshly decoded document.
func mergePatch(target, patch any) any {
	p, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	t, ok := target.(map[string]any)
	if !ok {
		t = map[string]any{}
	}
	for k, v := range p {
		if v == nil {
			delete(t, k)
			continue
		}
		t[k] = mergePatch(t[k], v)
	}
	return t
}

// decodeExact decodes JSON numbers as json.Number, so that integers past 2^53
// and long decimals come back out exactly as they went in.
func decodeExact(b []byte, v *any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the JSON value")
	}
	return nil
}
