package kuma_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
)

var benchData = json.RawMessage(`{"name":"Dwighson","role":"architect","email":"dwighson@example.com","team":"platform","level":7,"tags":["a","b","c"],"active":true,"note":"lorem ipsum dolor sit amet, consectetur"}`)

// BenchmarkMergePatchFold folds a batch of 100 ~200-byte events, as one append
// of the seed's workload does.
func BenchmarkMergePatchFold(b *testing.B) {
	events := make([]kuma.Event, 100)
	for i := range events {
		events[i] = kuma.Event{Version: int64(i + 1), Type: "UserUpdated", Data: benchData}
	}
	state := json.RawMessage(`{"name":"x","level":1}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := (kuma.MergePatch{}).Fold(state, events); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMergePatchFoldDecoded folds the same batch as it reaches the
// reducer from a decoded append: its data already checked.
func BenchmarkMergePatchFoldDecoded(b *testing.B) {
	req := kuma.AppendRequest{}
	for i := 0; i < 100; i++ {
		req.Events = append(req.Events, kuma.EventInput{Type: "UserUpdated", Data: benchData})
	}
	body, _ := json.Marshal(req)
	var r kuma.AppendRequest
	if err := kuma.Decode(body, &r); err != nil {
		b.Fatal(err)
	}
	events := make([]kuma.Event, len(r.Events))
	for i, in := range r.Events {
		events[i] = in.Event("e", int64(i+1), time.Time{})
	}
	state := json.RawMessage(`{"name":"x","level":1}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := (kuma.MergePatch{}).Fold(state, events); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeAppend decodes and validates an append of 100 events.
func BenchmarkDecodeAppend(b *testing.B) {
	req := kuma.AppendRequest{IdempotencyKey: "k"}
	for i := 0; i < 100; i++ {
		req.Events = append(req.Events, kuma.EventInput{Type: "UserUpdated", Data: benchData})
	}
	body, _ := json.Marshal(req)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		var r kuma.AppendRequest
		if err := kuma.Decode(body, &r); err != nil {
			b.Fatal(err)
		}
		if err := r.Validate(kuma.Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeAppendGeneral decodes the same append through the general
// path (a leading space is not the Go client's shape): encoding/json, then
// the strict walk. What the direct path saves.
func BenchmarkDecodeAppendGeneral(b *testing.B) {
	req := kuma.AppendRequest{IdempotencyKey: "k"}
	for i := 0; i < 100; i++ {
		req.Events = append(req.Events, kuma.EventInput{Type: "UserUpdated", Data: benchData})
	}
	body, _ := json.Marshal(req)
	body = append([]byte(" "), body...)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		var r kuma.AppendRequest
		if err := kuma.Decode(body, &r); err != nil {
			b.Fatal(err)
		}
		if err := r.Validate(kuma.Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}
