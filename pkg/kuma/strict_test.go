package kuma

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// appendWith is an append request of one event with the given data, in the
// Go client's shape, so that the direct path would take it if it could.
func appendWith(data string) string {
	return `{"events":[{"type":"A","data":` + data + `}]}`
}

// manyKeys is an object with n distinct keys and then, if dup, the first
// key again: past maxFastKeys the direct path leaves duplicates to the
// general path's map.
func manyKeys(n int, dup bool) string {
	var b strings.Builder
	b.WriteString("{")
	for i := range n {
		fmt.Fprintf(&b, `"k%d":%d,`, i, i)
	}
	if dup {
		b.WriteString(`"k0":1,`)
	}
	b.WriteString(`"end":true}`)
	return b.String()
}

// TestDecodeRefusesWhatStrictParsersCannotReadBack: bodies that encoding/json
// accepts but that would be stored and then read back as JSON that strict
// parsers in other languages refuse or read differently. Both the direct
// path and the general path must refuse the same (the direct one by
// leaving them to the general one), with the documented code.
func TestDecodeRefusesWhatStrictParsersCannotReadBack(t *testing.T) {
	const bad, inv, ok = CodeBadRequest, CodeInvalidEvent, Code("")
	for _, tc := range []struct {
		name, body string
		want       Code
	}{
		{"data not UTF-8", appendWith("{\"s\":\"\xff\xfe\"}"), bad},
		{"data key not UTF-8", appendWith("{\"\xc3\":1}"), bad},
		{"encoded surrogate bytes", appendWith("\"\xed\xa0\x80\""), bad},
		{"overlong encoding", appendWith("\"\xc0\xaf\""), bad},
		{"idempotency key not UTF-8", "{\"events\":[{\"type\":\"A\"}],\"idempotency_key\":\"\xff\"}", bad},
		{"UTF-8 is fine", appendWith(`{"s":"é 日本 😀"}`), ok},
		{"top-level key twice", `{"events":[{"type":"A"}],"events":[{"type":"B"}]}`, bad},
		{"expected_version twice", `{"events":[{"type":"A"}],"expected_version":1,"expected_version":2}`, bad},
		{"event key twice", `{"events":[{"type":"A","type":"B"}]}`, bad},
		{"event data twice", `{"events":[{"type":"A","data":{"a":1},"data":{"a":2}}]}`, bad},
		{"data key twice", appendWith(`{"a":1,"a":2}`), inv},
		{"data key twice, nested", appendWith(`{"x":{"a":1,"b":{"a":3},"a":2}}`), inv},
		{"data key twice, in an array", appendWith(`[1,{"a":1,"a":1}]`), inv},
		{"data key twice, once escaped", appendWith(`{"a":1,"\u0061":2}`), inv},
		{"data key twice, both escaped", appendWith(`{"\n":1,"\u000a":2}`), inv},
		{"data key twice, many keys", appendWith(manyKeys(40, true)), inv},
		{"many distinct keys", appendWith(manyKeys(40, false)), ok},
		{"same key in sibling objects", appendWith(`{"x":{"a":1},"y":{"a":1},"z":[{"a":1},{"a":2}]}`), ok},
		{"keys equal but for case", appendWith(`{"a":1,"A":2}`), ok},
		{"lone high surrogate", appendWith(`"\ud800"`), inv},
		{"lone high surrogate, upper case", appendWith(`"\uDA00"`), inv},
		{"lone low surrogate", appendWith(`"\udc00"`), inv},
		{"high surrogate then a letter", appendWith(`"\ud800\u0041"`), inv},
		{"two high surrogates", appendWith(`"\ud800\ud800"`), inv},
		{"lone surrogate in a key", appendWith(`{"\udfff":1}`), inv},
		{"surrogate pair", appendWith(`"\ud83d\ude00"`), ok},
		{"surrogate pair in a key", appendWith(`{"\uD83D\uDE00":1}`), ok},
		{"lone surrogate in the idempotency key", `{"events":[{"type":"A"}],"idempotency_key":"\ud800"}`, bad},
		{"1e400", appendWith(`{"n":1e400}`), inv},
		{"-1e400", appendWith(`[-1e400]`), inv},
		{"1E+309", appendWith(`1E+309`), inv},
		{"400 digits", appendWith(strings.Repeat("9", 400)), inv},
		{"400 digits then a small exponent", appendWith("0." + strings.Repeat("9", 400) + "e5"), ok},
		{"1e308", appendWith(`1e308`), ok},
		{"1.7976931348623157e308", appendWith(`1.7976931348623157e308`), ok},
		{"1e-400 reads as 0 everywhere", appendWith(`1e-400`), ok},
		{"0e999", appendWith(`0e999`), ok},
		{"12e299", appendWith(`12e299`), ok},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := []byte(tc.body)
			var fast AppendRequest
			if tc.want != ok && decodeAppendFast(body, &fast) == nil {
				t.Fatalf("the direct path took %q", body)
			}
			var general AppendRequest
			checkCode(t, "general path", decodeGeneral(body, &general), tc.want)
			var got AppendRequest
			err := Decode(body, &got)
			checkCode(t, "Decode", err, tc.want)
			if tc.want == inv {
				var ke *Error
				if errors.As(err, &ke) && ke.Details["index"] != 0 {
					t.Errorf("details %v, want index 0", ke.Details)
				}
			}
		})
	}
}

func checkCode(t *testing.T, what string, err error, want Code) {
	t.Helper()
	if want == "" {
		if err != nil {
			t.Errorf("%s: %v, want it accepted", what, err)
		}
		return
	}
	var ke *Error
	if !errors.As(err, &ke) || ke.Code != want {
		t.Errorf("%s: got %v, want %s", what, err, want)
	}
}

// TestDecodeInvalidEventNamesTheEvent: the index in a refusal of data is the
// offending event's, so that a client can find it in a large batch.
func TestDecodeInvalidEventNamesTheEvent(t *testing.T) {
	body := `{"events":[{"type":"A","data":{"a":1}},{"type":"B"},{"type":"C","data":{"a":1,"a":2}}]}`
	var r AppendRequest
	err := Decode([]byte(body), &r)
	var ke *Error
	if !errors.As(err, &ke) || ke.Code != CodeInvalidEvent || ke.Details["index"] != 2 {
		t.Fatalf("got %v (details %v), want invalid_event with index 2", err, ke)
	}
}

// TestDecodeEveryRequestRefusesBadInput: every request body the services
// decode refuses bytes that are not UTF-8, duplicate keys, lone surrogates
// and numbers beyond a double with bad_request (there is no event data in
// them), whichever decoding path its type takes.
func TestDecodeEveryRequestRefusesBadInput(t *testing.T) {
	type other struct { // a type without an exact field list: the DisallowUnknownFields path
		A string         `json:"a"`
		B map[string]any `json:"b"`
	}
	for _, tc := range []struct {
		name string
		new  func() any
		body string
	}{
		{"read key twice", func() any { return new(ReadRequest) }, `{"at_version":1,"at_version":2}`},
		{"history key twice", func() any { return new(HistoryRequest) }, `{"limit":1,"limit":1}`},
		{"forget reason not UTF-8", func() any { return new(ForgetRequest) }, "{\"reason\":\"\xff\"}"},
		{"forget lone surrogate", func() any { return new(ForgetRequest) }, `{"reason":"\udc00"}`},
		{"query key twice", func() any { return new(QueryRequest) }, `{"limit":1,"query":"q","limit":2}`},
		{"query param twice", func() any { return new(QueryRequest) }, `{"params":{"where":{"a":1},"where":{"a":2}}}`},
		{"query param 1e400", func() any { return new(QueryRequest) }, `{"params":{"where":{"n":1e400}}}`},
		{"query param not UTF-8", func() any { return new(QueryRequest) }, "{\"params\":{\"prefix\":\"\xfe\"}}"},
		{"skip position twice", func() any { return new(SkipRequest) }, `{"position":"p1.0.1","position":"p1.0.2"}`},
		{"migrate key twice", func() any { return new(MigrateRequest) }, `{"shard":1,"shard":2}`},
		{"other type not UTF-8", func() any { return new(other) }, "{\"a\":\"\xff\"}"},
		{"other type key twice", func() any { return new(other) }, `{"a":"x","a":"y"}`},
		{"other type nested key twice", func() any { return new(other) }, `{"b":{"k":1,"k":2}}`},
		{"export body key twice", func() any { return new(struct{}) }, "{}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Decode([]byte(tc.body), tc.new())
			want := CodeBadRequest
			if tc.name == "export body key twice" {
				want = "" // {} is fine: a control for the empty-struct path
			}
			checkCode(t, "Decode", err, want)
		})
	}
}

// TestReadRequestTimeRange: at_time outside what an int64 of nanoseconds
// holds is refused, naming the range, instead of wrapping around.
func TestReadRequestTimeRange(t *testing.T) {
	for _, tc := range []struct {
		at string
		ok bool
	}{
		{"2263-01-01T00:00:00Z", false},
		{"9999-12-31T23:59:59Z", false},
		{"1677-01-01T00:00:00Z", false},
		{"0001-01-01T00:00:00Z", false},
		{"2262-04-11T23:47:16Z", true},
		{"2262-04-11T23:47:17Z", false},
		{"1677-09-21T00:12:44Z", true},
		{"1678-01-01T00:00:00Z", true},
		{"2026-11-25T14:03:07Z", true},
	} {
		var r ReadRequest
		if err := Decode([]byte(`{"at_time":"`+tc.at+`"}`), &r); err != nil {
			t.Fatalf("%s: %v", tc.at, err)
		}
		err := r.Validate()
		if tc.ok {
			checkCode(t, tc.at, err, "")
			continue
		}
		checkCode(t, tc.at, err, CodeBadRequest)
		if err != nil && !strings.Contains(err.Error(), "1677-09-21") {
			t.Errorf("%s: %v does not name the range", tc.at, err)
		}
	}
}

// TestDecodeEmpty: the bodies of requests without fields (export, status,
// rebuild, retry) are empty or an empty object; anything else is refused.
func TestDecodeEmpty(t *testing.T) {
	for _, body := range []string{"", "  ", "{}", " { } ", "null"} {
		checkCode(t, strconvQuote(body), DecodeEmpty([]byte(body)), "")
	}
	for _, body := range []string{`{"a":1}`, "\xff", `[]`, `{} {}`, "{\"\xff\":1}", `"x"`} {
		checkCode(t, strconvQuote(body), DecodeEmpty([]byte(body)), CodeBadRequest)
	}
}

func strconvQuote(s string) string { return fmt.Sprintf("%q", s) }
