package kuma

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
)

// relayMessage is a message as a relay makes it: appends of a few
// entities, each a run of consecutive versions at consecutive positions
// and one time, some idempotent, some entities' events left out
// (forgotten), named by pseudonyms.
func relayMessage(rng *rand.Rand) StreamMessage {
	m := StreamMessage{Context: "default", Shard: rng.IntN(4096), Events: []StreamEvent{}}
	seq := rng.Int64N(1 << 40)
	versions := map[string]int64{}
	for range rng.IntN(30) {
		ent := strings.Repeat(string(rune('A'+rng.IntN(5))), 43)
		n := 1 + rng.IntN(5)
		t := time.Unix(rng.Int64N(4e9), rng.Int64N(1e9)).UTC()
		forgotten := rng.IntN(6) == 0
		for i := range n {
			seq++
			versions[ent]++
			if forgotten {
				continue // a hole in the positions
			}
			p := make([]byte, 1+rng.IntN(300))
			for j := range p {
				p[j] = byte(rng.IntN(256))
			}
			e := StreamEvent{Pseudonym: ent, Version: versions[ent], Position: Position{Shard: m.Shard, Seq: seq}.String(), Time: t, Payload: p}
			if i == n-1 && rng.IntN(2) == 0 {
				e.IdempotencyKey, e.FirstVersion = "sha256:"+strings.Repeat("k", 43), versions[ent]-int64(n)+1
			}
			m.Events = append(m.Events, e)
		}
	}
	return m
}

// TestStream2MatchesJSON: for what a relay writes, format 2 decodes to the
// very StreamMessage the format-1 (JSON) path gives.
func TestStream2MatchesJSON(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 500 {
		m := relayMessage(rng)
		if i == 0 {
			m.Events = m.Events[:0] // an epoch claim's empty list
		}
		j, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		b, err := EncodeStreamMessage2(nil, &m)
		if err != nil {
			t.Fatal(err)
		}
		var v1, v2 StreamMessage
		if err := DecodeStreamMessageFormat(StreamFormat1, j, &v1); err != nil {
			t.Fatal(err)
		}
		if err := DecodeStreamMessageFormat(StreamFormat2, b, &v2); err != nil {
			t.Fatalf("decode %x: %v", b, err)
		}
		if !reflect.DeepEqual(v1, v2) {
			t.Fatalf("format 2 gives\n%+v\nJSON gives\n%+v", v2, v1)
		}
	}
}

// TestStream2Runs: an append's events share one run header; an
// idempotency key ends a run; anything else that differs starts a new one.
func TestStream2Runs(t *testing.T) {
	at := time.Date(2026, 11, 25, 14, 3, 7, 123456789, time.UTC)
	ev := func(p string, v, seq int64) StreamEvent {
		return StreamEvent{Pseudonym: p, Version: v, Position: Position{Shard: 3, Seq: seq}.String(), Time: at, Payload: []byte{1, 2, 3}}
	}
	idem := ev("a", 3, 12)
	idem.IdempotencyKey, idem.FirstVersion = "sha256:k", 1
	later := ev("a", 5, 14)
	later.Time = at.Add(time.Millisecond)
	for _, tc := range []struct {
		name string
		evs  []StreamEvent
		runs int
	}{
		{"one append", []StreamEvent{ev("a", 1, 10), ev("a", 2, 11), ev("a", 3, 12)}, 1},
		{"an idempotent append, then the next", []StreamEvent{ev("a", 1, 10), ev("a", 2, 11), idem, ev("a", 4, 13)}, 2},
		{"two entities", []StreamEvent{ev("a", 1, 10), ev("b", 1, 11), ev("a", 2, 12)}, 3},
		{"a hole in positions", []StreamEvent{ev("a", 1, 10), ev("a", 2, 12)}, 2},
		{"another time", []StreamEvent{ev("a", 4, 13), later}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := StreamMessage{Context: "c", Shard: 3, Events: tc.evs}
			b, err := EncodeStreamMessage2(nil, &m)
			if err != nil {
				t.Fatal(err)
			}
			if got := countRuns(t, b); got != tc.runs {
				t.Errorf("%d runs, want %d", got, tc.runs)
			}
			var got StreamMessage
			if err := DecodeStreamMessageFormat(StreamFormat2, b, &got); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, m) {
				t.Errorf("got %+v, want %+v", got, m)
			}
		})
	}
}

func countRuns(t *testing.T, b []byte) int {
	r := &stream2Reader{b: b}
	r.byte()
	r.bytes(stream2MaxName)
	r.uvarint()
	n := 0
	for r.err == nil && r.i < len(b) {
		h := r.run()
		r.skipPayloads(h.n)
		n++
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	return n
}

// TestStream2EncodeRefuses what format 2 cannot carry.
func TestStream2EncodeRefuses(t *testing.T) {
	ok := StreamEvent{Pseudonym: "p", Version: 1, Position: "p1.3.1", Time: time.Unix(1, 0).UTC(), Payload: []byte{1}}
	back := []StreamEvent{ok, ok}
	back[1].Pseudonym = "q"
	if _, err := EncodeStreamMessage2(nil, &StreamMessage{Context: "c", Shard: 3, Events: back}); err == nil {
		t.Error("positions that do not increase: encoded")
	}
	for name, mod := range map[string]func(*StreamEvent){
		"an entity by its id":  func(e *StreamEvent) { e.Pseudonym, e.Entity = "", "user_1" },
		"another shard":        func(e *StreamEvent) { e.Position = "p1.4.1" },
		"no position":          func(e *StreamEvent) { e.Position = "" },
		"a leading zero":       func(e *StreamEvent) { e.Position = "p1.3.01" },
		"a sign":               func(e *StreamEvent) { e.Position = "p1.3.+1" },
		"a shard of two zeros": func(e *StreamEvent) { e.Position = "p1.03.1" },
		"position 0":           func(e *StreamEvent) { e.Position = "p1.3.0" },
		"a negative version":   func(e *StreamEvent) { e.Version = -1 },
		"a time past 2262":     func(e *StreamEvent) { e.Time = time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC) },
	} {
		e := ok
		mod(&e)
		if _, err := EncodeStreamMessage2(nil, &StreamMessage{Context: "c", Shard: 3, Events: []StreamEvent{e}}); err == nil {
			t.Errorf("%s: encoded", name)
		}
	}
}

// TestStream2Hostile: truncated, garbled or oversized bodies are errors,
// never a panic or a large allocation.
func TestStream2Hostile(t *testing.T) {
	m := relayMessage(rand.New(rand.NewPCG(5, 6)))
	good, err := EncodeStreamMessage2(nil, &m)
	if err != nil {
		t.Fatal(err)
	}
	var sm StreamMessage
	for i := range len(good) - 1 {
		// A cut at a run's boundary is a shorter message, but never one
		// that reads as the whole.
		if err := decodeStream2(good[:i], &sm); err == nil && len(sm.Events) >= len(m.Events) {
			t.Fatalf("a body cut at %d reads as %d events", i, len(sm.Events))
		}
	}
	head := func(b ...[]byte) []byte {
		out := []byte{stream2Version, 1, 'c', 3}
		for _, x := range b {
			out = append(out, x...)
		}
		return out
	}
	uv := func(v uint64) []byte { return binary.AppendUvarint(nil, v) }
	run := func(flags byte, v, seq, n uint64) []byte {
		b := append([]byte{flags, 1, 'p'}, uv(v)...)
		b = append(b, uv(seq)...)
		b = append(b, 0)
		return append(b, uv(n)...)
	}
	for name, b := range map[string][]byte{
		"empty":                          {},
		"format 1 as 2":                  []byte(`{"context":"c","shard":3,"events":[]}`),
		"format 3":                       {3, 1, 'c', 3},
		"a huge context":                 append([]byte{stream2Version}, uv(1<<40)...),
		"a shard past int32":             append([]byte{stream2Version, 1, 'c'}, uv(1<<40)...),
		"a varint of 11 bytes":           append([]byte{stream2Version, 1, 'c'}, bytes.Repeat([]byte{0xff}, 11)...),
		"unknown flags":                  head(run(4, 1, 1, 1), []byte{0}),
		"a run of no events":             head(run(0, 1, 1, 0)),
		"a run of 2^60 events":           head(run(0, 1, 1, 1<<60), []byte{0}),
		"a run past its bytes":           head(run(0, 1, 1, 3), []byte{1, 'x'}),
		"a payload past the end":         head(run(0, 1, 1, 1), uv(1<<50), []byte{1}),
		"position 0":                     head(run(0, 1, 0, 1), []byte{0}),
		"version 0":                      head(run(0, 0, 1, 1), []byte{0}),
		"versions past int64":            head(run(0, math.MaxInt64, 1, 2), []byte{0, 0}),
		"positions past int64":           head(run(0, 1, math.MaxInt64, 2), []byte{0, 0}),
		"positions going back":           head(run(0, 1, 5, 1), []byte{0}, run(0, 2, 5, 1), []byte{0}),
		"a key flag and no key":          head(run(stream2FlagKey, 1, 1, 1), []byte{0, 0}),
		"first version 0 with flag":      head(run(stream2FlagFV, 1, 1, 1), []byte{0, 0}),
		"an empty pseudonym":             head([]byte{0, 0, 1, 1, 0, 1, 0}),
		"a pseudonym of 2^40 bytes":      head([]byte{0}, uv(1<<40)),
		"trailing byte after a run":      head(run(0, 1, 1, 1), []byte{0}, []byte{0}),
		"a run header cut in the middle": head(run(0, 1, 1, 1)[:4]),
	} {
		allocs := testing.AllocsPerRun(1, func() {
			if err := DecodeStreamMessageFormat(StreamFormat2, b, &sm); err == nil {
				t.Errorf("%s: %x decoded: %+v", name, b, sm)
			}
		})
		if allocs > 4 {
			t.Errorf("%s: %v allocations", name, allocs)
		}
	}
}

// TestStream2PayloadsShareTheBody: decoding copies no payload, and a
// payload's capacity ends where it does, so an append to one never writes
// over the next.
func TestStream2PayloadsShareTheBody(t *testing.T) {
	m := relayMessage(rand.New(rand.NewPCG(7, 8)))
	b, err := EncodeStreamMessage2(nil, &m)
	if err != nil {
		t.Fatal(err)
	}
	var sm StreamMessage
	if err := decodeStream2(b, &sm); err != nil {
		t.Fatal(err)
	}
	for _, e := range sm.Events {
		if cap(e.Payload) != len(e.Payload) {
			t.Fatalf("a payload of %d bytes has capacity %d", len(e.Payload), cap(e.Payload))
		}
	}
	// A message of 1,000 events costs a handful of allocations: the
	// events, their positions' text, the context, one pseudonym and key
	// per run.
	big := StreamMessage{Context: "c", Shard: 3}
	for i := range 1000 {
		big.Events = append(big.Events, StreamEvent{Pseudonym: strings.Repeat("p", 43), Version: int64(i + 1),
			Position: Position{Shard: 3, Seq: int64(i + 1)}.String(), Time: time.Unix(5, 0).UTC(), Payload: make([]byte, 200)})
	}
	b, _ = EncodeStreamMessage2(nil, &big)
	if allocs := testing.AllocsPerRun(10, func() { _ = decodeStream2(b, &sm) }); allocs > 6 {
		t.Errorf("decoding 1,000 events of one run took %v allocations", allocs)
	}
}

func TestParseStreamFormat(t *testing.T) {
	for h, want := range map[string]int{"": 1, "1": 1, "2": 2, "3": 0, " 2": 0, "02": 0} {
		got, err := ParseStreamFormat(h)
		if got != want || (err == nil) != (want != 0) {
			t.Errorf("ParseStreamFormat(%q) = %d, %v; want %d", h, got, err, want)
		}
	}
}

// checkStream2 is FuzzDecodeStreamMessage's check of format 2: whatever
// the bytes, decoding returns (no panic), and a body that decodes encodes
// back to the same message.
func checkStream2(t *testing.T, body []byte) {
	var m StreamMessage
	if err := DecodeStreamMessageFormat(StreamFormat2, body, &m); err != nil {
		return
	}
	again, err := EncodeStreamMessage2(nil, &m)
	if err != nil {
		t.Fatalf("%x decodes to %+v, which does not encode: %v", body, m, err)
	}
	var m2 StreamMessage
	if err := DecodeStreamMessageFormat(StreamFormat2, again, &m2); err != nil || !reflect.DeepEqual(m, m2) {
		t.Fatalf("%x: decoded %+v, re-encoded and decoded %+v (%v)", body, m, m2, err)
	}
}
