package kuma

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

// referenceFold is RFC 7386 over fully decoded documents: slow and obvious,
// to check the raw-member fold against.
func referenceFold(state []byte, patches [][]byte) ([]byte, error) {
	decode := func(b []byte) (any, error) {
		d := json.NewDecoder(bytes.NewReader(b))
		d.UseNumber()
		var v any
		err := d.Decode(&v)
		return v, err
	}
	var doc any
	if len(state) > 0 {
		var err error
		if doc, err = decode(state); err != nil {
			return nil, err
		}
	}
	var merge func(t, p any) any
	merge = func(t, p any) any {
		pm, ok := p.(map[string]any)
		if !ok {
			return p
		}
		tm, ok := t.(map[string]any)
		if !ok {
			tm = map[string]any{}
		}
		for k, v := range pm {
			if v == nil {
				delete(tm, k)
			} else {
				tm[k] = merge(tm[k], v)
			}
		}
		return tm
	}
	for _, p := range patches {
		v, err := decode(p)
		if err != nil {
			return nil, err
		}
		doc = merge(doc, v)
	}
	return json.Marshal(doc)
}

// FuzzMergePatchMatchesReference: for any valid JSON state and patches, the
// fast fold equals the reference; for invalid ones it refuses.
func FuzzMergePatchMatchesReference(f *testing.F) {
	f.Add([]byte(`{"a":1,"b":{"c":[1,2]}}`), []byte(`{"b":{"c":null,"d":"x"},"e":{"f":null}}`), []byte(`{"a":null}`))
	f.Add([]byte(`[1]`), []byte(`{"k\u00e9y":{"x":1}}`), []byte(`"s"`))
	f.Add([]byte(`{}`), []byte(` { "a" : { "b" : "}" } , "c":"\"" } `), []byte(`{"a":{"b":{"c":1}}}`))
	f.Add([]byte(``), []byte(`12345678901234567890`), []byte(`{"n":1.00000000000000000001}`))
	f.Fuzz(func(t *testing.T, state, p1, p2 []byte) {
		if len(state) > 0 && !json.Valid(state) {
			return
		}
		events := []Event{{Data: p1}, {Data: p2}}
		got, err := MergePatch{}.Fold(state, events)
		if !json.Valid(p1) || !json.Valid(p2) {
			if err == nil {
				t.Fatalf("invalid patch accepted: %q %q", p1, p2)
			}
			return
		}
		want, rerr := referenceFold(state, [][]byte{p1, p2})
		if err != nil || rerr != nil {
			t.Fatalf("Fold error %v, reference error %v", err, rerr)
		}
		var g, w any
		dg := json.NewDecoder(bytes.NewReader(got))
		dg.UseNumber()
		dw := json.NewDecoder(bytes.NewReader(want))
		dw.UseNumber()
		if dg.Decode(&g) != nil || dw.Decode(&w) != nil {
			t.Fatalf("outputs not JSON: %s / %s", got, want)
		}
		gb, _ := json.Marshal(g)
		wb, _ := json.Marshal(w)
		if !bytes.Equal(gb, wb) {
			t.Fatalf("state %q + %q + %q: got %s, want %s", state, p1, p2, got, want)
		}
		// Data the decoder checked is walked without a second check: the
		// same state.
		checked := []Event{{Data: p1, checked: true}, {Data: p2, checked: true}}
		if again, err := (MergePatch{}).Fold(state, checked); err != nil || !bytes.Equal(again, got) {
			t.Fatalf("state %q + checked %q + %q: got %s, %v, want %s", state, p1, p2, again, err, got)
		}
	})
}

// Decode marks an append's events checked, by either path, and Event
// passes the mark on; events made by hand are not marked.
func TestDecodeMarksEventsChecked(t *testing.T) {
	for _, body := range []string{
		`{"events":[{"type":"A","data":{"x":1}},{"type":"B"}]}`,  // the direct path
		` {"events":[{"type":"A","data":{"x":1}},{"type":"B"}]}`, // the general one
	} {
		var r AppendRequest
		if err := Decode([]byte(body), &r); err != nil {
			t.Fatal(err)
		}
		for i, in := range r.Events {
			if ev := in.Event("e", int64(i+1), time.Time{}); !ev.checked || !in.checked {
				t.Errorf("%s: event %d not marked checked", body, i)
			}
		}
	}
	if (EventInput{Type: "A", Data: []byte(`{`)}).Event("e", 1, time.Time{}).checked {
		t.Error("an event made by hand is marked checked")
	}
}
