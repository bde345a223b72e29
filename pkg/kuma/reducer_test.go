package kuma_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

// jsonEqual reports whether a and b are the same JSON value, whatever the
// spacing and key order.
func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("not JSON: %s: %v", a, err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatalf("not JSON: %s: %v", b, err)
	}
	return reflect.DeepEqual(x, y)
}

func ev(data string) kuma.Event {
	return kuma.Event{Entity: "e", Type: "Patched", Data: json.RawMessage(data)}
}

func fold(t *testing.T, state string, patches ...string) json.RawMessage {
	t.Helper()
	var st json.RawMessage
	if state != "" {
		st = json.RawMessage(state)
	}
	evs := make([]kuma.Event, len(patches))
	for i, p := range patches {
		evs[i] = ev(p)
		evs[i].Version = int64(i + 1)
	}
	got, err := kuma.MergePatch{}.Fold(st, evs)
	if err != nil {
		t.Fatalf("Fold(%s, %v): got error %v, want nil", state, patches, err)
	}
	return got
}

// rfc7386Vectors are the test cases of RFC 7386, Appendix A.
var rfc7386Vectors = []struct {
	original, patch, result string
}{
	{`{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`},
	{`{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`},
	{`{"a":"b"}`, `{"a":null}`, `{}`},
	{`{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`},
	{`{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`},
	{`{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`},
	{`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`},
	{`{"a":[{"b":"c"}]}`, `{"a":[1]}`, `{"a":[1]}`},
	{`["a","b"]`, `["c","d"]`, `["c","d"]`},
	{`{"a":"b"}`, `["c"]`, `["c"]`},
	{`{"a":"foo"}`, `null`, `null`},
	{`{"a":"foo"}`, `"bar"`, `"bar"`},
	{`{"e":null}`, `{"a":1}`, `{"e":null,"a":1}`},
	{`[1,2]`, `{"a":"b","c":null}`, `{"a":"b"}`},
	{`{}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
}

func TestMergePatchRFC7386AppendixA(t *testing.T) {
	for _, v := range rfc7386Vectors {
		t.Run(v.original+" + "+v.patch, func(t *testing.T) {
			got := fold(t, v.original, v.patch)
			if !jsonEqual(t, got, []byte(v.result)) {
				t.Fatalf("Fold(%s, %s): got %s, want %s", v.original, v.patch, got, v.result)
			}
		})
	}
}

// The example of RFC 7386, section 3.
func TestMergePatchRFC7386Section3(t *testing.T) {
	original := `{
	  "title": "Goodbye!",
	  "author" : {"givenName" : "John", "familyName" : "Doe"},
	  "tags":[ "example", "sample" ],
	  "content": "This will be unchanged"
	}`
	patch := `{
	  "title": "Hello!",
	  "phoneNumber": "+01-123-456-7890",
	  "author": {"familyName": null},
	  "tags": [ "example" ]
	}`
	want := `{
	  "title": "Hello!",
	  "author" : {"givenName" : "John"},
	  "tags": [ "example" ],
	  "content": "This will be unchanged",
	  "phoneNumber": "+01-123-456-7890"
	}`
	if got := fold(t, original, patch); !jsonEqual(t, got, []byte(want)) {
		t.Fatalf("got %s, want %s", got, want)
	}
}

func TestMergePatchFold(t *testing.T) {
	tests := []struct {
		name    string
		state   string // "" = nil state (entity with no events yet)
		patches []string
		want    string
	}{
		{"no events, nil state", "", nil, `null`},
		{"no events keeps state", `{"a":1}`, nil, `{"a":1}`},
		{"nil state, one object", "", []string{`{"name":"Dwighson","role":"architect"}`}, `{"name":"Dwighson","role":"architect"}`},
		{"nil state, null member dropped", "", []string{`{"a":1,"b":null}`}, `{"a":1}`},
		{"nil state, nested null dropped", "", []string{`{"a":{"b":null,"c":2}}`}, `{"a":{"c":2}}`},
		{"nil state, scalar", "", []string{`42`}, `42`},
		{"null state", `null`, []string{`{"a":1}`}, `{"a":1}`},
		{"empty patch keeps state", `{"a":1}`, []string{`{}`}, `{"a":1}`},
		{"README seed", "", []string{
			`{"name":"Dwighson","role":"architect"}`,
			`{"role":"lead"}`,
		}, `{"name":"Dwighson","role":"lead"}`},
		{"in order: later wins", "", []string{`{"a":1}`, `{"a":2}`, `{"a":3}`}, `{"a":3}`},
		{"in order: delete then set", `{"a":1}`, []string{`{"a":null}`, `{"a":"back"}`}, `{"a":"back"}`},
		{"in order: set then delete", `{"a":1}`, []string{`{"a":"x"}`, `{"a":null}`}, `{}`},
		{"deep merge over several events", "", []string{
			`{"user":{"name":"A","tags":["x"]}}`,
			`{"user":{"email":"a@example.com"}}`,
			`{"user":{"tags":["y","z"],"name":null}}`,
			`{"count":1}`,
		}, `{"user":{"email":"a@example.com","tags":["y","z"]},"count":1}`},
		{"scalar then object", "", []string{`"s"`, `{"a":1}`}, `{"a":1}`},
		{"object then array then object", "", []string{`{"a":1}`, `[1]`, `{"b":2}`}, `{"b":2}`},
		{"null event wipes state", `{"a":1}`, []string{`null`}, `null`},
		{"null event then object", `{"a":1}`, []string{`null`, `{"b":2}`}, `{"b":2}`},
		{"object replaces nested scalar", `{"a":1}`, []string{`{"a":{"b":2}}`}, `{"a":{"b":2}}`},
		{"unicode and escapes kept", "", []string{`{"name":"Zoë \"Z\" <z@x>","emoji":"🦊"}`}, `{"name":"Zoë \"Z\" <z@x>","emoji":"🦊"}`},
		{"numbers kept", "", []string{`{"i":-7,"f":0.25,"e":1.5e3,"z":0}`}, `{"i":-7,"f":0.25,"e":1500,"z":0}`},
		{"booleans", `{"a":true}`, []string{`{"a":false,"b":true}`}, `{"a":false,"b":true}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := fold(t, tc.state, tc.patches...)
			if !jsonEqual(t, got, []byte(tc.want)) {
				t.Fatalf("Fold(%s, %v): got %s, want %s", tc.state, tc.patches, got, tc.want)
			}
		})
	}
}

// Folding events one call at a time gives the same state as folding them in
// one batch: a snapshot plus the events after it must equal a full replay.
func TestMergePatchFoldIsIncremental(t *testing.T) {
	patches := []string{
		`{"a":{"b":1,"c":[1,2]}}`, `{"a":{"b":null}}`, `{"d":"x"}`, `{"a":{"c":{"e":1}}}`,
		`{"d":null,"f":true}`, `{"a":{"c":{"e":null,"g":2}}}`,
	}
	all := fold(t, "", patches...)
	var state json.RawMessage
	for i, p := range patches {
		next, err := kuma.MergePatch{}.Fold(state, []kuma.Event{ev(p)})
		if err != nil {
			t.Fatalf("event %d: got %v, want nil", i, err)
		}
		state = next
	}
	if !jsonEqual(t, state, all) {
		t.Fatalf("one at a time: got %s, want %s (one batch)", state, all)
	}
	for split := range len(patches) + 1 {
		head := fold(t, "", patches[:split]...)
		got := fold(t, string(head), patches[split:]...)
		if !jsonEqual(t, got, all) {
			t.Fatalf("split at %d: got %s, want %s", split, got, all)
		}
	}
}

func TestMergePatchFoldDoesNotModifyInputs(t *testing.T) {
	state := json.RawMessage(`{"a":{"b":"c","d":[1,2]},"keep":true,"gone":1}`)
	stateCopy := bytes.Clone(state)
	evs := []kuma.Event{
		ev(`{"a":{"b":"x","d":null,"n":{"m":1}},"gone":null}`),
		ev(`{"a":{"n":{"m":null}},"new":[{"x":1}]}`),
	}
	evCopies := make([][]byte, len(evs))
	for i := range evs {
		evCopies[i] = bytes.Clone(evs[i].Data)
	}

	got, err := kuma.MergePatch{}.Fold(state, evs)
	if err != nil {
		t.Fatalf("Fold: got %v, want nil", err)
	}
	want := `{"a":{"b":"x","n":{}},"keep":true,"new":[{"x":1}]}`
	if !jsonEqual(t, got, []byte(want)) {
		t.Fatalf("got %s, want %s", got, want)
	}
	if !bytes.Equal(state, stateCopy) {
		t.Fatalf("input state changed: got %s, want %s", state, stateCopy)
	}
	for i := range evs {
		if !bytes.Equal(evs[i].Data, evCopies[i]) {
			t.Fatalf("event %d data changed: got %s, want %s", i, evs[i].Data, evCopies[i])
		}
	}
	// The result does not share memory with the input: writing to it leaves
	// the input alone.
	for i := range got {
		got[i] = 'X'
	}
	if !bytes.Equal(state, stateCopy) {
		t.Fatalf("input state changed through the result: got %s, want %s", state, stateCopy)
	}

	// Folding the same input again gives the same answer.
	again, err := kuma.MergePatch{}.Fold(state, evs)
	if err != nil || !jsonEqual(t, again, []byte(want)) {
		t.Fatalf("second Fold: got (%s, %v), want (%s, nil)", again, err, want)
	}
}

// Fold is called from many goroutines at once (see Reducer); run with -race.
func TestMergePatchFoldConcurrent(t *testing.T) {
	state := json.RawMessage(`{"a":{"b":1},"list":[1,2,3]}`)
	evs := []kuma.Event{ev(`{"a":{"c":2}}`), ev(`{"a":{"b":null}}`)}
	want := []byte(`{"a":{"c":2},"list":[1,2,3]}`)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			got, err := kuma.MergePatch{}.Fold(state, evs)
			if err != nil {
				errs <- err
				return
			}
			var x, y any
			_ = json.Unmarshal(got, &x)
			_ = json.Unmarshal(want, &y)
			if !reflect.DeepEqual(x, y) {
				errs <- fmt.Errorf("got %s, want %s", got, want)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestMergePatchFoldErrors(t *testing.T) {
	t.Run("event data not JSON", func(t *testing.T) {
		// Refused half-way too: the fold checks a patch as it applies it,
		// so the first members are applied before the bad one is seen.
		for _, data := range []string{`{`, `{"a":}`, `nul`, `'a'`, ``, `{"a":1} x`,
			`{"a":{"b":1},"c":}`, `{"a":1,"b":[1,]}`, `{"a":1,"b":"\x"}`, `{"a":1,"é":tru}`, `{"a":{"b":1},"a":nul}`} {
			evs := []kuma.Event{ev(`{"ok":1}`), ev(data)}
			got, err := kuma.MergePatch{}.Fold(json.RawMessage(`{}`), evs)
			requireCode(t, err, kuma.CodeInvalidEvent)
			if got != nil {
				t.Errorf("data %q: got state %s with the error, want nil", data, got)
			}
			if !errors.Is(err, kuma.ErrInvalidEvent) {
				t.Errorf("data %q: errors.Is(err, ErrInvalidEvent): got false, want true", data)
			}
		}
	})
	t.Run("state not JSON", func(t *testing.T) {
		got, err := kuma.MergePatch{}.Fold(json.RawMessage(`{"a":`), []kuma.Event{ev(`{}`)})
		if err == nil {
			t.Fatalf("got state %s, want an error", got)
		}
		// A corrupt stored state is the server's fault, not the client's.
		if code := kuma.ErrorCode(err); code != kuma.CodeInternal {
			t.Fatalf("got code %q, want %q", code, kuma.CodeInternal)
		}
	})
}

// A patch the one-scan check leaves to encoding/json (a key written twice,
// non-ASCII text) after it has applied some of its members is applied again
// whole; the result is that of applying it once.
func TestMergePatchFallbackAppliesOnce(t *testing.T) {
	for _, c := range []struct{ state, patch, want string }{
		{`{"a":{"x":1}}`, `{"a":{"y":2},"a":{"x":null}}`, `{"a":{"y":2}}`},
		{`{"a":{"x":1}}`, `{"a":{"y":2},"a":null}`, `{}`},
		{`{"n":1}`, `{"n":null,"m":{"k":[1]},"s":"é"}`, `{"m":{"k":[1]},"s":"é"}`},
		// A key written twice at the top is applied twice by the first
		// pass, then the whole patch again: still the last one wins.
		{`{"a":{"y":2}}`, `{"a":{"x":1},"a":{"x":null,"z":3},"s":"é"}`, `{"a":{"y":2,"z":3},"s":"é"}`},
		{`{"a":{"y":2}}`, `{"a":7,"a":{"x":1},"s":"é"}`, `{"a":{"x":1},"s":"é"}`},
		{`{"deep":{}}`, `{"deep":{"a":1},"z":` + strings.Repeat(`[`, 70) + strings.Repeat(`]`, 70) + `}`,
			`{"deep":{"a":1},"z":` + strings.Repeat(`[`, 70) + strings.Repeat(`]`, 70) + `}`},
	} {
		if got := fold(t, c.state, c.patch); !jsonEqual(t, got, []byte(c.want)) {
			t.Errorf("Fold(%s, %s): got %s, want %s", c.state, c.patch, got, c.want)
		}
	}
}

func TestReducerFunc(t *testing.T) {
	var calls int
	var r kuma.Reducer = kuma.ReducerFunc(func(state json.RawMessage, evs []kuma.Event) (json.RawMessage, error) {
		calls++
		return json.RawMessage(fmt.Sprintf(`{"count":%d}`, len(evs))), nil
	})
	got, err := r.Fold(nil, []kuma.Event{ev(`{}`), ev(`{}`)})
	if err != nil || string(got) != `{"count":2}` || calls != 1 {
		t.Fatalf("got (%s, %v) after %d calls, want ({\"count\":2}, nil) after 1", got, err, calls)
	}
	var _ kuma.Reducer = kuma.MergePatch{}
}

// Integers above 2^53 are valid JSON and must survive a fold unchanged.
// MergePatch decodes into interface{}, so numbers go through float64.
func TestMergePatchKeepsLargeIntegers(t *testing.T) {

	for _, data := range []string{
		`{"id":9007199254740993}`,
		`{"id":12345678901234567890}`,
		`{"amount":0.1000000000000000055511151231257827}`,
	} {
		got := fold(t, "", data)
		if string(got) != data {
			t.Errorf("Fold(nil, %s): got %s, want %s", data, got, data)
		}
	}
}
