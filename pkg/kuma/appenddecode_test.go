package kuma

import (
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
)

// generalDecodeAppend is Decode's general path for an append request.
func generalDecodeAppend(body []byte) (AppendRequest, error) {
	var r AppendRequest
	err := decodeGeneral(body, &r)
	return r, err
}

// randomData is a JSON value of the kinds events carry: nested objects and
// arrays, escapes, numbers of every form, literals, and at times non-ASCII
// (which the direct path leaves to the general one).
func randomData(rng *rand.Rand, depth int) any {
	switch k := rng.IntN(8); {
	case k < 3 && depth < 4:
		m := map[string]any{}
		for i := range rng.IntN(5) {
			m["k"+strings.Repeat("\"\\/\n\t\u0001", rng.IntN(2))+string(rune('a'+i))] = randomData(rng, depth+1)
		}
		return m
	case k == 3 && depth < 4:
		a := make([]any, rng.IntN(4))
		for i := range a {
			a[i] = randomData(rng, depth+1)
		}
		return a
	case k == 4:
		return []any{0, -0.5, 1e21, 123456789, -7, 3.25e-8}[rng.IntN(6)]
	case k == 5:
		return []any{true, false, nil}[rng.IntN(3)]
	case k == 6:
		return []string{"plain", "tab\there", `quote " and \ back`, "<html>&", "é ü 日本", "\u2028"}[rng.IntN(6)]
	}
	return "x"
}

// TestDecodeAppendMatchesGeneralPath: on what the Go client sends (encoding/
// json's output), the direct path is taken whenever the data is ASCII and
// gives what the general path gives.
func TestDecodeAppendMatchesGeneralPath(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	fastCount := 0
	for range 500 {
		req := AppendRequest{IdempotencyKey: []string{"", "sha256:abc", "order-7"}[rng.IntN(3)]}
		if rng.IntN(2) == 0 {
			v := rng.Int64N(1000)
			req.ExpectedVersion = &v
		}
		for range 1 + rng.IntN(20) {
			ev := EventInput{Type: "UserUpdated"}
			if rng.IntN(5) != 0 {
				ev.Data, _ = json.Marshal(randomData(rng, 0))
			}
			req.Events = append(req.Events, ev)
		}
		body, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		want, err := generalDecodeAppend(body)
		if err != nil {
			t.Fatal(err)
		}
		var got AppendRequest
		if err := decodeAppendFast(body, &got); err != nil {
			if isASCII(body) {
				t.Fatalf("the Go client's encoding took the general path: %s", body)
			}
			continue
		}
		fastCount++
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("direct %+v, general %+v, for %s", got, want, body)
		}
	}
	if fastCount < 100 {
		t.Fatalf("only %d of 500 requests took the direct path", fastCount)
	}
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// TestDecodeAppendFallsBack: what the direct path does not take (other key
// orders, whitespace, escapes in the type, malformed data) goes to the
// general path, which accepts or refuses it as before.
func TestDecodeAppendFallsBack(t *testing.T) {
	for _, tc := range []struct {
		body string
		ok   bool // the general path accepts it
	}{
		{`{"idempotency_key":"k","events":[{"type":"A"}]}`, true},
		{`{ "events":[{"type":"A"}]}`, true},
		{`{"events":[{"type":"A\u0042"}]}`, true},
		{`{"events":[{"data":{},"type":"A"}]}`, true},
		{`{"events":[{"type":"A","data":{"a":01}}]}`, false},
		{`{"events":[{"type":"A","data":{"a":1,}}]}`, false},
		{`{"events":[{"type":"A","data":{"a":"\x"}}]}`, false},
		{`{"events":[{"type":"A","data":[1 2]}]}`, false},
		{`{"events":[{"type":"A","data":tru}]}`, false},
		{`{"events":[{"type":"A","data":{"a":1}}]}  `, true},
		{`{"events":[{"type":"A","data":{"a":1}}],"expected_version":1.5}`, false},
		{`{"events":[{"type":"A","data":{"a":1}}],"Expected_Version":1}`, false},
		{`{"events":[{"type":"A","data":"` + "\x01" + `"}]}`, false},
		{`{"events":[{"type":"A","data":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}]}`, true},
	} {
		var fast AppendRequest
		if decodeAppendFast([]byte(tc.body), &fast) == nil {
			t.Errorf("%s: the direct path took it", tc.body)
		}
		var got AppendRequest
		err := Decode([]byte(tc.body), &got)
		if (err == nil) != tc.ok {
			t.Errorf("%s: Decode gave %v, want ok=%v", tc.body, err, tc.ok)
		}
	}
}

// FuzzDecodeAppendMatchesGeneralPath: whatever the bytes, when the direct
// path takes a request the general path takes it too, with the same result.
func FuzzDecodeAppendMatchesGeneralPath(f *testing.F) {
	for _, s := range []string{
		`{"events":[{"type":"A","data":{"a":[1,-2.5e3,true,null,"\u00e9\n"]}}],"expected_version":0,"idempotency_key":"k"}`,
		`{"events":[{"type":"A"},{"type":"B","data":null}]}`,
		`{"events":[{"type":"A","data":{ "a" : [ ] , "b":{}}}]}`,
		`{"events":[]}`,
		// What strict parsers cannot read back: both paths refuse it.
		"{\"events\":[{\"type\":\"A\",\"data\":{\"s\":\"\xff\xfe\"}}]}",
		`{"events":[{"type":"A"}],"events":[{"type":"B"}]}`,
		`{"events":[{"type":"A","data":{"a":1,"b":{"a":2},"a":3}}]}`,
		`{"events":[{"type":"A","data":{"a":1,"\u0061":2}}]}`,
		`{"events":[{"type":"A","data":["\ud800","\ud83d\ude00","\uDBFF\uDFFF"]}]}`,
		`{"events":[{"type":"A","data":[1e400,1e308,1e-400,12e299,0e999]}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var got AppendRequest
		if decodeAppendFast(body, &got) != nil {
			return
		}
		want, err := generalDecodeAppend(body)
		if err != nil {
			t.Fatalf("direct path took %q, which the general path refuses: %v", body, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("direct %+v, general %+v", got, want)
		}
	})
}
