package kuma_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
)

func i64(v int64) *int64 { return &v }

func events(n int) []kuma.EventInput {
	evs := make([]kuma.EventInput, n)
	for i := range evs {
		evs[i] = kuma.EventInput{Type: "Happened", Data: json.RawMessage(`{"n":1}`)}
	}
	return evs
}

// jsonString returns a JSON string literal of exactly n bytes (quotes included).
func jsonString(n int) json.RawMessage {
	return json.RawMessage(`"` + strings.Repeat("x", n-2) + `"`)
}

func TestLimitsWithDefaults(t *testing.T) {
	tests := []struct {
		name string
		in   kuma.Limits
		want kuma.Limits
	}{
		{"zero", kuma.Limits{}, kuma.Limits{MaxEventBytes: 64 << 10, MaxBatch: 1000}},
		{"negative", kuma.Limits{MaxEventBytes: -1, MaxBatch: -5}, kuma.Limits{MaxEventBytes: 65536, MaxBatch: 1000}},
		{"custom kept", kuma.Limits{MaxEventBytes: 10, MaxBatch: 2}, kuma.Limits{MaxEventBytes: 10, MaxBatch: 2}},
		{"half custom", kuma.Limits{MaxBatch: 7}, kuma.Limits{MaxEventBytes: 65536, MaxBatch: 7}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.in.WithDefaults(); got != tc.want {
				t.Fatalf("WithDefaults(%+v): got %+v, want %+v", tc.in, got, tc.want)
			}
		})
	}
	if kuma.DefaultMaxEventBytes != 65536 || kuma.DefaultMaxBatch != 1000 {
		t.Fatalf("got defaults %d bytes / %d events, want 65536 / 1000 (PROTOCOL.md)", kuma.DefaultMaxEventBytes, kuma.DefaultMaxBatch)
	}
}

func TestAppendRequestValidate(t *testing.T) {
	tests := []struct {
		name      string
		req       kuma.AppendRequest
		limits    kuma.Limits
		wantCode  kuma.Code // "" = valid
		wantIndex int       // details["index"] when >= 0
	}{
		{name: "one event", req: kuma.AppendRequest{Events: events(1)}, wantIndex: -1},
		{name: "1000 events (default max)", req: kuma.AppendRequest{Events: events(1000)}, wantIndex: -1},
		{name: "expected_version 0", req: kuma.AppendRequest{Events: events(1), ExpectedVersion: i64(0)}, wantIndex: -1},
		{name: "expected_version 42", req: kuma.AppendRequest{Events: events(1), ExpectedVersion: i64(42)}, wantIndex: -1},
		{name: "idempotency key of 128", req: kuma.AppendRequest{Events: events(1), IdempotencyKey: strings.Repeat("k", 128)}, wantIndex: -1},
		{name: "data exactly 64 KiB", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: "Big", Data: jsonString(65536)}}}, wantIndex: -1},
		{name: "data of any JSON kind", req: kuma.AppendRequest{Events: []kuma.EventInput{
			{Type: "A", Data: json.RawMessage(`[1,2]`)},
			{Type: "B", Data: json.RawMessage(`"s"`)},
			{Type: "C", Data: json.RawMessage(`3`)},
			{Type: "D", Data: json.RawMessage(`null`)},
			{Type: "E", Data: json.RawMessage(`true`)},
		}}, wantIndex: -1},

		{name: "nil events", req: kuma.AppendRequest{}, wantCode: kuma.CodeBadRequest, wantIndex: -1},
		{name: "empty events", req: kuma.AppendRequest{Events: []kuma.EventInput{}}, wantCode: kuma.CodeBadRequest, wantIndex: -1},
		// PROTOCOL.md's table lists "bad batch size" under bad_request;
		// payload_too_large is for bytes over a limit.
		{name: "1001 events", req: kuma.AppendRequest{Events: events(1001)}, wantCode: kuma.CodeBadRequest, wantIndex: -1},
		{name: "data 64 KiB + 1", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: "Big", Data: jsonString(65537)}}}, wantCode: kuma.CodePayloadTooLarge, wantIndex: 0},
		{name: "oversize data at index 2", req: kuma.AppendRequest{Events: append(events(2), kuma.EventInput{Type: "Big", Data: jsonString(70000)})}, wantCode: kuma.CodePayloadTooLarge, wantIndex: 2},
		{name: "empty type", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: ""}}}, wantCode: kuma.CodeInvalidEvent, wantIndex: 0},
		{name: "bad type at index 3", req: kuma.AppendRequest{Events: append(events(3), kuma.EventInput{Type: "bad type"})}, wantCode: kuma.CodeInvalidEvent, wantIndex: 3},
		{name: "type with star", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: "A*"}}}, wantCode: kuma.CodeInvalidEvent, wantIndex: 0},
		{name: "type of 129", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: strings.Repeat("T", 129)}}}, wantCode: kuma.CodeInvalidEvent, wantIndex: 0},
		{name: "first problem wins", req: kuma.AppendRequest{Events: []kuma.EventInput{
			{Type: "Ok"}, {Type: "Big", Data: jsonString(70000)}, {Type: "1bad"},
		}}, wantCode: kuma.CodePayloadTooLarge, wantIndex: 1},
		{name: "negative expected_version", req: kuma.AppendRequest{Events: events(1), ExpectedVersion: i64(-1)}, wantCode: kuma.CodeBadRequest, wantIndex: -1},
		{name: "idempotency key of 129", req: kuma.AppendRequest{Events: events(1), IdempotencyKey: strings.Repeat("k", 129)}, wantCode: kuma.CodeBadRequest, wantIndex: -1},

		{name: "custom batch limit ok", req: kuma.AppendRequest{Events: events(3)}, limits: kuma.Limits{MaxBatch: 3}, wantIndex: -1},
		{name: "custom batch limit over", req: kuma.AppendRequest{Events: events(4)}, limits: kuma.Limits{MaxBatch: 3}, wantCode: kuma.CodeBadRequest, wantIndex: -1},
		{name: "custom size limit ok", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: "A", Data: jsonString(10)}}}, limits: kuma.Limits{MaxEventBytes: 10}, wantIndex: -1},
		{name: "custom size limit over", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: "A", Data: jsonString(11)}}}, limits: kuma.Limits{MaxEventBytes: 10}, wantCode: kuma.CodePayloadTooLarge, wantIndex: 0},
		{name: "custom size limit above default", req: kuma.AppendRequest{Events: []kuma.EventInput{{Type: "A", Data: jsonString(100000)}}}, limits: kuma.Limits{MaxEventBytes: 1 << 20}, wantIndex: -1},
		{name: "custom batch limit above default", req: kuma.AppendRequest{Events: events(1500)}, limits: kuma.Limits{MaxBatch: 2000}, wantIndex: -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.req.Validate(tc.limits)
			if tc.wantCode == "" {
				if err != nil {
					t.Fatalf("Validate: got %v, want nil", err)
				}
				return
			}
			kerr := requireCode(t, err, tc.wantCode)
			if tc.wantIndex >= 0 {
				if got, ok := kerr.Details["index"]; !ok || got != tc.wantIndex {
					t.Fatalf("got details %v, want index %d", kerr.Details, tc.wantIndex)
				}
			} else if _, ok := kerr.Details["index"]; ok {
				t.Fatalf("got details %v, want no index", kerr.Details)
			}
		})
	}
}

func TestAppendRequestValidateDetailsSurviveJSON(t *testing.T) {
	req := kuma.AppendRequest{Events: append(events(4), kuma.EventInput{Type: "no spaces allowed"})}
	err := req.Validate(kuma.Limits{})
	body, merr := json.Marshal(kuma.ErrorReply{Error: kuma.AsError(err)})
	if merr != nil {
		t.Fatal(merr)
	}
	want := `"details":{"index":4}`
	if !strings.Contains(string(body), want) {
		t.Fatalf("got %s, want it to contain %s", body, want)
	}
}

// Validate must not hand out a shared error value: a second failing request
// must not see the details of the first.
func TestAppendRequestValidateFreshErrors(t *testing.T) {
	a := kuma.AppendRequest{Events: append(events(2), kuma.EventInput{Type: "!"})}
	b := kuma.AppendRequest{Events: []kuma.EventInput{{Type: "!"}}}
	errA := requireCode(t, a.Validate(kuma.Limits{}), kuma.CodeInvalidEvent)
	errB := requireCode(t, b.Validate(kuma.Limits{}), kuma.CodeInvalidEvent)
	if errA.Details["index"] != 2 || errB.Details["index"] != 0 {
		t.Fatalf("got indexes %v and %v, want 2 and 0", errA.Details["index"], errB.Details["index"])
	}
	if kuma.ErrInvalidEvent.Details != nil {
		t.Fatalf("got sentinel details %v, want nil", kuma.ErrInvalidEvent.Details)
	}
}

func TestAppendRequestValidateFillsAbsentData(t *testing.T) {
	req := kuma.AppendRequest{Events: []kuma.EventInput{
		{Type: "Named"},
		{Type: "Empty", Data: json.RawMessage{}},
		{Type: "Kept", Data: json.RawMessage(`{"a":1}`)},
		{Type: "Null", Data: json.RawMessage(`null`)},
	}}
	if err := req.Validate(kuma.Limits{}); err != nil {
		t.Fatalf("Validate: got %v, want nil", err)
	}
	want := []string{`{}`, `{}`, `{"a":1}`, `null`}
	for i, w := range want {
		if got := string(req.Events[i].Data); got != w {
			t.Errorf("event %d data: got %q, want %q", i, got, w)
		}
	}
}

func TestAppendRequestDecodeThenValidate(t *testing.T) {
	body := `{"events": [{"type": "UserCreated", "data": {"name": "Dwighson", "role": "architect"}}, {"type": "Ping"}],
	 "expected_version": 0,
	 "idempotency_key": "order-7731-attempt"}`
	var req kuma.AppendRequest
	if err := kuma.Decode([]byte(body), &req); err != nil {
		t.Fatalf("Decode: got %v, want nil", err)
	}
	if err := req.Validate(kuma.Limits{}); err != nil {
		t.Fatalf("Validate: got %v, want nil", err)
	}
	if req.ExpectedVersion == nil || *req.ExpectedVersion != 0 {
		t.Fatalf("got expected_version %v, want a pointer to 0 (must not exist), not nil (any)", req.ExpectedVersion)
	}
	if req.IdempotencyKey != "order-7731-attempt" {
		t.Fatalf("got idempotency_key %q, want %q", req.IdempotencyKey, "order-7731-attempt")
	}
	if len(req.Events) != 2 || req.Events[0].Type != "UserCreated" || string(req.Events[1].Data) != `{}` {
		t.Fatalf("got events %+v, want UserCreated then Ping with data {}", req.Events)
	}

	var anyVersion kuma.AppendRequest
	if err := kuma.Decode([]byte(`{"events":[{"type":"A"}]}`), &anyVersion); err != nil {
		t.Fatal(err)
	}
	if anyVersion.ExpectedVersion != nil {
		t.Fatalf("absent expected_version: got %d, want nil (any)", *anyVersion.ExpectedVersion)
	}
}

func TestReadRequestValidate(t *testing.T) {
	now := time.Date(2026, 11, 25, 14, 3, 7, 0, time.UTC)
	tests := []struct {
		name     string
		req      kuma.ReadRequest
		wantCode kuma.Code
	}{
		{"now", kuma.ReadRequest{}, ""},
		{"at version 1", kuma.ReadRequest{AtVersion: i64(1)}, ""},
		{"at version large", kuma.ReadRequest{AtVersion: i64(1 << 40)}, ""},
		{"at time", kuma.ReadRequest{AtTime: &now}, ""},
		{"at version 0", kuma.ReadRequest{AtVersion: i64(0)}, kuma.CodeBadRequest},
		{"at version negative", kuma.ReadRequest{AtVersion: i64(-3)}, kuma.CodeBadRequest},
		{"both", kuma.ReadRequest{AtVersion: i64(1), AtTime: &now}, kuma.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.req.Validate()
			if tc.wantCode == "" {
				if err != nil {
					t.Fatalf("Validate: got %v, want nil", err)
				}
				return
			}
			requireCode(t, err, tc.wantCode)
		})
	}
}

func TestReadRequestDecode(t *testing.T) {
	tests := []struct {
		name     string
		body     string
		wantCode kuma.Code
		check    func(*testing.T, kuma.ReadRequest)
	}{
		{"empty body", "", "", func(t *testing.T, r kuma.ReadRequest) {
			if r.AtVersion != nil || r.AtTime != nil {
				t.Fatalf("got %+v, want the zero value", r)
			}
		}},
		{"at_version", `{"at_version": 3}`, "", func(t *testing.T, r kuma.ReadRequest) {
			if r.AtVersion == nil || *r.AtVersion != 3 {
				t.Fatalf("got %v, want at_version 3", r.AtVersion)
			}
		}},
		{"at_time", `{"at_time": "2026-11-25T14:03:07.123456Z"}`, "", func(t *testing.T, r kuma.ReadRequest) {
			want := time.Date(2026, 11, 25, 14, 3, 7, 123456000, time.UTC)
			if r.AtTime == nil || !r.AtTime.Equal(want) {
				t.Fatalf("got %v, want %v", r.AtTime, want)
			}
		}},
		{"at_time with offset", `{"at_time": "2026-11-25T15:03:07+01:00"}`, "", func(t *testing.T, r kuma.ReadRequest) {
			want := time.Date(2026, 11, 25, 14, 3, 7, 0, time.UTC)
			if r.AtTime == nil || !r.AtTime.Equal(want) {
				t.Fatalf("got %v, want %v", r.AtTime, want)
			}
		}},
		{"bad time", `{"at_time": "yesterday"}`, kuma.CodeBadRequest, nil},
		{"date only", `{"at_time": "2026-11-25"}`, kuma.CodeBadRequest, nil},
		{"time as number", `{"at_time": 1764079387}`, kuma.CodeBadRequest, nil},
		{"version as string", `{"at_version": "3"}`, kuma.CodeBadRequest, nil},
		{"version fractional", `{"at_version": 1.5}`, kuma.CodeBadRequest, nil},
		{"both", `{"at_version": 3, "at_time": "2026-11-25T14:03:07Z"}`, kuma.CodeBadRequest, nil},
		{"at version 0", `{"at_version": 0}`, kuma.CodeBadRequest, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r kuma.ReadRequest
			err := kuma.Decode([]byte(tc.body), &r)
			if err == nil {
				err = r.Validate()
			}
			if tc.wantCode != "" {
				requireCode(t, err, tc.wantCode)
				return
			}
			if err != nil {
				t.Fatalf("got %v, want nil", err)
			}
			tc.check(t, r)
		})
	}
}

func TestHistoryRequestValidate(t *testing.T) {
	tests := []struct {
		name     string
		req      kuma.HistoryRequest
		want     kuma.HistoryRequest
		wantCode kuma.Code
	}{
		{"defaults", kuma.HistoryRequest{}, kuma.HistoryRequest{FromVersion: 1, Limit: 100}, ""},
		{"from kept", kuma.HistoryRequest{FromVersion: 7}, kuma.HistoryRequest{FromVersion: 7, Limit: 100}, ""},
		{"limit kept", kuma.HistoryRequest{Limit: 5}, kuma.HistoryRequest{FromVersion: 1, Limit: 5}, ""},
		{"limit 1", kuma.HistoryRequest{FromVersion: 1, Limit: 1}, kuma.HistoryRequest{FromVersion: 1, Limit: 1}, ""},
		{"limit 1000", kuma.HistoryRequest{FromVersion: 2, Limit: 1000}, kuma.HistoryRequest{FromVersion: 2, Limit: 1000}, ""},
		{"limit 1001", kuma.HistoryRequest{Limit: 1001}, kuma.HistoryRequest{}, kuma.CodeBadRequest},
		{"limit negative", kuma.HistoryRequest{Limit: -1}, kuma.HistoryRequest{}, kuma.CodeBadRequest},
		{"from negative", kuma.HistoryRequest{FromVersion: -1}, kuma.HistoryRequest{}, kuma.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.req
			err := r.Validate()
			if tc.wantCode != "" {
				requireCode(t, err, tc.wantCode)
				return
			}
			if err != nil {
				t.Fatalf("Validate(%+v): got %v, want nil", tc.req, err)
			}
			if r != tc.want {
				t.Fatalf("Validate(%+v): got %+v, want %+v", tc.req, r, tc.want)
			}
		})
	}
	if kuma.DefaultHistoryLimit != 100 || kuma.MaxHistoryLimit != 1000 {
		t.Fatalf("got history limits %d/%d, want 100/1000", kuma.DefaultHistoryLimit, kuma.MaxHistoryLimit)
	}
}

func TestDecode(t *testing.T) {
	tests := []struct {
		name     string
		body     string
		wantCode kuma.Code
	}{
		{"valid", `{"from_version": 2, "limit": 10}`, ""},
		{"valid with whitespace around", " \n\t{\"limit\": 10}\r\n ", ""},
		{"empty object", `{}`, ""},
		{"empty body", ``, ""},
		{"whitespace body", " \n\t\r ", ""},

		{"unknown field", `{"limit": 10, "offset": 5}`, kuma.CodeBadRequest},
		{"unknown field only", `{"sql": "drop table"}`, kuma.CodeBadRequest},
		{"malformed", `{"limit": 10`, kuma.CodeBadRequest},
		{"malformed key", `{limit: 10}`, kuma.CodeBadRequest},
		{"single quotes", `{'limit': 10}`, kuma.CodeBadRequest},
		{"trailing comma", `{"limit": 10,}`, kuma.CodeBadRequest},
		{"not JSON", `limit=10`, kuma.CodeBadRequest},
		{"trailing object", `{"limit": 10} {"limit": 20}`, kuma.CodeBadRequest},
		{"trailing garbage", `{"limit": 10} x`, kuma.CodeBadRequest},
		{"trailing brace", `{"limit": 10}}`, kuma.CodeBadRequest},
		{"trailing number", `{} 1`, kuma.CodeBadRequest},
		{"string for int", `{"limit": "10"}`, kuma.CodeBadRequest},
		{"float for int", `{"limit": 1.5}`, kuma.CodeBadRequest},
		{"exponent for int", `{"from_version": 1e3}`, kuma.CodeBadRequest},
		{"bool for int", `{"limit": true}`, kuma.CodeBadRequest},
		{"overflow", `{"from_version": 99999999999999999999}`, kuma.CodeBadRequest},
		{"array body", `[1, 2]`, kuma.CodeBadRequest},
		{"string body", `"limit"`, kuma.CodeBadRequest},
		{"number body", `10`, kuma.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r kuma.HistoryRequest
			err := kuma.Decode([]byte(tc.body), &r)
			if tc.wantCode == "" {
				if err != nil {
					t.Fatalf("Decode(%q): got %v, want nil", tc.body, err)
				}
				return
			}
			requireCode(t, err, tc.wantCode)
		})
	}
}

func TestDecodeAppendWrongTypes(t *testing.T) {
	for _, body := range []string{
		`{"events": {"type": "A"}}`,
		`{"events": [{"type": 1}]}`,
		`{"events": [{"type": "A", "extra": 1}]}`,
		`{"events": [{"type": "A"}], "expected_version": "0"}`,
		`{"events": [{"type": "A"}], "expected_version": -1.0}`,
		`{"events": [{"type": "A"}], "idempotency_key": 7}`,
		`{"events": [{"type": "A", "data": {"a": }}]}`,
		`{"events": [["A"]]}`,
		`{"events": "A"}`,
	} {
		t.Run(body, func(t *testing.T) {
			var r kuma.AppendRequest
			requireCode(t, kuma.Decode([]byte(body), &r), kuma.CodeBadRequest)
		})
	}
}

func TestDecodeEmptyBodyLeavesZeroValue(t *testing.T) {
	for _, body := range [][]byte{nil, {}, []byte("   "), []byte("\n")} {
		var r kuma.ReadRequest
		if err := kuma.Decode(body, &r); err != nil {
			t.Fatalf("Decode(%q): got %v, want nil", body, err)
		}
		if r != (kuma.ReadRequest{}) {
			t.Fatalf("Decode(%q): got %+v, want the zero value", body, r)
		}
	}
}

func TestDecodeErrorMessagesAreBounded(t *testing.T) {
	body := `{"limit": "` + strings.Repeat("A", 100000) + `"}`
	var r kuma.HistoryRequest
	kerr := requireCode(t, kuma.Decode([]byte(body), &r), kuma.CodeBadRequest)
	if len(kerr.Message) > 300 {
		t.Fatalf("got a %d-byte message, want a short one", len(kerr.Message))
	}
}

// PROTOCOL.md: an unknown field is bad_request. encoding/json matches field
// names case-insensitively, so {"LIMIT": 5} is taken as "limit" rather than
// refused as unknown.
func TestDecodeRefusesCaseVariantFields(t *testing.T) {

	for _, body := range []string{`{"LIMIT": 5}`, `{"Limit": 5}`, `{"From_Version": 2}`} {
		var r kuma.HistoryRequest
		requireCode(t, kuma.Decode([]byte(body), &r), kuma.CodeBadRequest)
	}
}

func TestReplyWireNames(t *testing.T) {
	tm := time.Date(2026, 11, 25, 14, 3, 7, 123456000, time.UTC)
	tests := []struct {
		name string
		v    any
		want string
	}{
		{"append reply", kuma.AppendReply{Entity: "user_0x9A4F", FirstVersion: 1, LastVersion: 1, Time: tm, Position: "p1.0.1"},
			`{"entity":"user_0x9A4F","first_version":1,"last_version":1,"time":"2026-11-25T14:03:07.123456Z","position":"p1.0.1"}`},
		{"duplicate append reply", kuma.AppendReply{Entity: "e", FirstVersion: 1, LastVersion: 2, Time: tm, Position: "p1.0.2", Duplicate: true},
			`{"entity":"e","first_version":1,"last_version":2,"time":"2026-11-25T14:03:07.123456Z","position":"p1.0.2","duplicate":true}`},
		{"history reply at end", kuma.HistoryReply{Entity: "e", Events: []kuma.RecordedEvent{{Version: 1, Type: "A", Data: json.RawMessage(`{}`), Time: tm}}},
			`{"entity":"e","events":[{"version":1,"type":"A","data":{},"time":"2026-11-25T14:03:07.123456Z"}],"next_version":null}`},
		{"history reply with next", kuma.HistoryReply{Entity: "e", Events: []kuma.RecordedEvent{}, NextVersion: i64(101)},
			`{"entity":"e","events":[],"next_version":101}`},
		{"read reply", kuma.ReadReply{Entity: "e", Version: 1, State: json.RawMessage(`{"a":1}`), CreatedAt: tm, UpdatedAt: tm},
			`{"entity":"e","version":1,"state":{"a":1},"created_at":"2026-11-25T14:03:07.123456Z","updated_at":"2026-11-25T14:03:07.123456Z"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := json.Marshal(tc.v)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestAppendRequestValidateBatchDetails(t *testing.T) {
	req := kuma.AppendRequest{Events: events(6)}
	kerr := requireCode(t, req.Validate(kuma.Limits{MaxBatch: 5}), kuma.CodeBadRequest)
	if got := kerr.Details["max_batch"]; got != 5 {
		t.Fatalf("got details %v, want max_batch 5", kerr.Details)
	}
	req = kuma.AppendRequest{Events: []kuma.EventInput{{Type: "A", Data: jsonString(20)}}}
	kerr = requireCode(t, req.Validate(kuma.Limits{MaxEventBytes: 10}), kuma.CodePayloadTooLarge)
	if got := kerr.Details["max_event_bytes"]; got != 10 {
		t.Fatalf("got details %v, want max_event_bytes 10", kerr.Details)
	}
}

// The exact-key check must reach the events' own keys but never look inside
// event data, whose keys are the user's business.
func TestDecodeAppendKeysAreExact(t *testing.T) {
	bad := []string{
		`{"Events":[{"type":"E"}]}`,
		`{"events":[{"Type":"E"}]}`,
		`{"events":[{"type":"E"},{"type":"E","DATA":{}}]}`,
		`{"events":[{"type":"E"}],"Idempotency_Key":"k"}`,
		`{"events":[{"type":"E"}],"expected_version":1,"Expected_Version":5}`,
	}
	for _, body := range bad {
		var r kuma.AppendRequest
		requireCode(t, kuma.Decode([]byte(body), &r), kuma.CodeBadRequest)
	}
	good := `{"events":[{"type":"E","data":{"Type":1,"EVENTS":[{"X":{"Events":2}}],"s":"\"}{,"}},{"data":[{"A":1}],"type":"F"}],"idempotency_key":"a\"b"}`
	var r kuma.AppendRequest
	if err := kuma.Decode([]byte(good), &r); err != nil {
		t.Fatalf("Decode(%s) = %v, want nil: keys inside data are free", good, err)
	}
	if len(r.Events) != 2 || r.Events[1].Type != "F" || r.IdempotencyKey != `a"b` {
		t.Fatalf("decoded %+v", r)
	}
}
