package kuma

import (
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
)

func randomMessage(rng *rand.Rand) StreamMessage {
	m := StreamMessage{Context: "default", Shard: rng.IntN(4096)}
	for i := range rng.IntN(50) {
		p := make([]byte, rng.IntN(400))
		for j := range p {
			p[j] = byte(rng.IntN(256))
		}
		m.Events = append(m.Events, StreamEvent{
			Entity: "user_" + strings.Repeat("x", rng.IntN(20)), Version: rng.Int64N(1 << 62),
			Position: Position{Shard: m.Shard, Seq: int64(i + 1)}.String(),
			Time:     time.Unix(rng.Int64N(4e9), rng.Int64N(1e9)).UTC().Truncate(time.Duration(rng.IntN(3)) * time.Microsecond),
			Payload:  p,
		})
		if rng.IntN(2) == 0 { // today's form: the entity by its pseudonym
			m.Events[len(m.Events)-1].Entity = ""
			m.Events[len(m.Events)-1].Pseudonym = strings.Repeat("P_-9", 10) + "abc"
		}
		if rng.IntN(3) == 0 { // the last event of an idempotent append
			e := &m.Events[len(m.Events)-1]
			e.IdempotencyKey, e.FirstVersion = "sha256:"+strings.Repeat("k", 43), max(1, e.Version-rng.Int64N(5))
		}
	}
	return m
}

// TestDecodeStreamMessageMatchesEncodingJSON: on what the relay writes, the
// direct path gives what encoding/json gives.
func TestDecodeStreamMessageMatchesEncodingJSON(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 300 {
		m := randomMessage(rng)
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var fast, ref StreamMessage
		if err := decodeStreamFast(b, &fast); err != nil {
			t.Fatalf("the relay's own encoding took the slow path: %v\n%s", err, b)
		}
		if err := json.Unmarshal(b, &ref); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(fast, ref) {
			t.Fatalf("direct path %+v, encoding/json %+v", fast, ref)
		}
	}
}

// TestDecodeStreamMessageFallsBack: other spellings of the same message,
// and broken ones, give exactly encoding/json's result.
func TestDecodeStreamMessageFallsBack(t *testing.T) {
	for _, in := range []string{
		`{"context":"default","shard":3,"events":[]}`,
		`{"context":"default","shard":3,"events":null}`,
		` {"context":"default","shard":3,"events":[]}`,
		`{"shard":3,"context":"default","events":[]}`,
		`{"context":"d\u0065fault","shard":3,"events":[{"entity":"a","version":1,"position":"p1.3.1","time":"2026-11-25T14:03:07.123456Z","payload":"AQI="}]}`,
		`{"context":"default","shard":3,"events":[{"entity":"a","version":1,"position":"p1.3.1","time":"2026-11-25T14:03:07.123456Z","payload":"AQI="}],"extra":1}`,
		`{"context":"default","shard":3,"events":[{"entity":"a","version":01,"position":"p1.3.1","time":"2026-11-25T14:03:07Z","payload":"AQI="}]}`,
		`{"context":"default","shard":3,"events":[{"entity":"a","version":1,"position":"p1.3.1","time":"2026-11-25 14:03:07Z","payload":"AQI="}]}`,
		`{"context":"default","shard":3,"events":[{"entity":"a","version":1,"position":"p1.3.1","time":"2026-11-25T14:03:07Z","payload":"AQI"}]}`,
		`{"context":"default","shard":3,"events":[{"entity":"a","version":1,"position":"p1.3.1","time":"2026-11-25T14:03:07Z","payload":null}]}`,
		`{"context":"default","shard":99999999999,"events":[]}`,
		`{"context":"default","shard":3,"events":[{"pseudonym":"Pq_-","entity":"a","version":1,"position":"p1.3.1","time":"2026-11-25T14:03:07Z","payload":"AQI="}]}`,
		`{"context":"default","shard":3,"events":[{"version":1,"position":"p1.3.1","time":"2026-11-25T14:03:07Z","payload":"AQI="}]}`,
		`{"context":"default","shard":3,"events":[]}x`,
		`{"context":"default","shard":3,"events":[`,
		`not json`,
	} {
		var got, want StreamMessage
		gerr := DecodeStreamMessage([]byte(in), &got)
		werr := json.Unmarshal([]byte(in), &want)
		if (gerr == nil) != (werr == nil) || !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n got %+v, %v\nwant %+v, %v", in, got, gerr, want, werr)
		}
	}
}

func BenchmarkDecodeStreamMessage(b *testing.B) {
	m := randomMessage(rand.New(rand.NewPCG(3, 4)))
	for len(m.Events) < 1000 {
		m.Events = append(m.Events, m.Events...)
	}
	data, _ := json.Marshal(m)
	b.Run("direct", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			var out StreamMessage
			if err := DecodeStreamMessage(data, &out); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			var out StreamMessage
			if err := json.Unmarshal(data, &out); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// FuzzDecodeStreamMessage: whatever the bytes, format 1's result and
// whether it is an error are encoding/json's, and format 2's decoder
// neither panics nor accepts what it would not write (checkStream2). The
// seeds are messages of both formats.
func FuzzDecodeStreamMessage(f *testing.F) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 5 {
		b, _ := json.Marshal(randomMessage(rng))
		f.Add(b)
		m := relayMessage(rng)
		b, err := EncodeStreamMessage2(nil, &m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"context":"default","shard":3,"events":null}`))
	f.Add([]byte{stream2Version, 1, 'c', 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		checkStream2(t, in)
		var got, want StreamMessage
		gerr := DecodeStreamMessage(in, &got)
		werr := json.Unmarshal(in, &want)
		if (gerr == nil) != (werr == nil) {
			t.Fatalf("error %v, encoding/json %v", gerr, werr)
		}
		if werr == nil && !reflect.DeepEqual(got, want) {
			t.Fatalf("got %+v, encoding/json %+v", got, want)
		}
	})
}
