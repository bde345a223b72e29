package kuma_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

// The table of PROTOCOL.md, "Errors", with the sentinel for each code.
var protocolCodes = []struct {
	code     kuma.Code
	wire     string
	status   int
	sentinel *kuma.Error
}{
	{kuma.CodeBadRequest, "bad_request", 400, kuma.ErrBadRequest},
	{kuma.CodeInvalidEntityID, "invalid_entity_id", 400, kuma.ErrInvalidEntityID},
	{kuma.CodeInvalidEvent, "invalid_event", 400, kuma.ErrInvalidEvent},
	{kuma.CodeForbidden, "forbidden", 403, kuma.ErrForbidden},
	{kuma.CodeNotFound, "not_found", 404, kuma.ErrNotFound},
	{kuma.CodeVersionConflict, "version_conflict", 409, kuma.ErrVersionConflict},
	{kuma.CodeEntityForgotten, "entity_forgotten", 410, kuma.ErrEntityForgotten},
	{kuma.CodePayloadTooLarge, "payload_too_large", 413, kuma.ErrPayloadTooLarge},
	{kuma.CodeUnavailable, "unavailable", 503, kuma.ErrUnavailable},
	{kuma.CodeTimeout, "timeout", 504, kuma.ErrTimeout},
	{kuma.CodeInternal, "internal", 500, kuma.ErrInternal},
}

func TestCodeStatusAndWireName(t *testing.T) {
	for _, tc := range protocolCodes {
		t.Run(tc.wire, func(t *testing.T) {
			if got := string(tc.code); got != tc.wire {
				t.Errorf("got wire name %q, want %q", got, tc.wire)
			}
			if got := tc.code.Status(); got != tc.status {
				t.Errorf("%s.Status(): got %d, want %d", tc.code, got, tc.status)
			}
			if !tc.code.Known() {
				t.Errorf("%s.Known(): got false, want true", tc.code)
			}
			if tc.sentinel.Code != tc.code {
				t.Errorf("sentinel code: got %q, want %q", tc.sentinel.Code, tc.code)
			}
		})
	}
}

func TestUnknownCode(t *testing.T) {
	for _, c := range []kuma.Code{"", "teapot", "BAD_REQUEST", "bad_request "} {
		if got := c.Status(); got != 500 {
			t.Errorf("Code(%q).Status(): got %d, want 500", c, got)
		}
		if c.Known() {
			t.Errorf("Code(%q).Known(): got true, want false", c)
		}
	}
}

func TestErrorString(t *testing.T) {
	tests := []struct {
		err  *kuma.Error
		want string
	}{
		{&kuma.Error{Code: kuma.CodeNotFound}, "not_found"},
		{&kuma.Error{Code: kuma.CodeNotFound, Message: "entity user_1 was never written"}, "not_found: entity user_1 was never written"},
		{kuma.Errorf(kuma.CodeBadRequest, "limit %d is over %d", 2000, 1000), "bad_request: limit 2000 is over 1000"},
	}
	for _, tc := range tests {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error(): got %q, want %q", got, tc.want)
		}
	}
}

func TestErrorsIsMatchesByCode(t *testing.T) {
	for _, tc := range protocolCodes {
		t.Run(tc.wire, func(t *testing.T) {
			err := kuma.Errorf(tc.code, "some message %d", 42)
			wrapped := fmt.Errorf("call kuma.default.append.x: %w", err)
			twice := fmt.Errorf("retry 3: %w", wrapped)
			joined := errors.Join(io.EOF, err)
			for name, e := range map[string]error{"bare": err, "wrapped": wrapped, "wrapped twice": twice, "joined": joined} {
				if !errors.Is(e, tc.sentinel) {
					t.Errorf("%s: errors.Is(%v, Err<%s>): got false, want true", name, e, tc.code)
				}
				// A fresh *Error with the same code and another message matches too.
				if !errors.Is(e, &kuma.Error{Code: tc.code, Message: "other"}) {
					t.Errorf("%s: errors.Is against a same-code error: got false, want true", name)
				}
				for _, other := range protocolCodes {
					if other.code == tc.code {
						continue
					}
					if errors.Is(e, other.sentinel) {
						t.Errorf("%s: errors.Is(%v, Err<%s>): got true, want false", name, e, other.code)
					}
				}
			}
		})
	}
}

func TestErrorsIsIgnoresNonKumaErrors(t *testing.T) {
	if errors.Is(io.EOF, kuma.ErrInternal) {
		t.Errorf("errors.Is(io.EOF, ErrInternal): got true, want false")
	}
	if errors.Is(kuma.ErrNotFound, io.EOF) {
		t.Errorf("errors.Is(ErrNotFound, io.EOF): got true, want false")
	}
	if errors.Is(errors.New("not_found"), kuma.ErrNotFound) {
		t.Errorf("errors.Is(errors.New(\"not_found\"), ErrNotFound): got true, want false")
	}
}

func TestErrorsAsThroughWrapping(t *testing.T) {
	err := fmt.Errorf("client: %w", kuma.VersionConflict(3, 5))
	var kerr *kuma.Error
	if !errors.As(err, &kerr) {
		t.Fatalf("errors.As: got false, want true")
	}
	if kerr.Code != kuma.CodeVersionConflict {
		t.Fatalf("got code %q, want %q", kerr.Code, kuma.CodeVersionConflict)
	}
}

func TestVersionConflict(t *testing.T) {
	err := kuma.VersionConflict(3, 5)
	if err.Code != kuma.CodeVersionConflict {
		t.Fatalf("got code %q, want %q", err.Code, kuma.CodeVersionConflict)
	}
	if !strings.Contains(err.Message, "3") || !strings.Contains(err.Message, "5") {
		t.Errorf("got message %q, want both versions in it", err.Message)
	}
	if got, ok := err.ActualVersion(); !ok || got != 5 {
		t.Errorf("ActualVersion(): got (%d, %v), want (5, true)", got, ok)
	}
}

func TestActualVersionAfterJSONRoundTrip(t *testing.T) {
	tests := []struct {
		name   string
		actual int64
	}{
		{"zero (entity does not exist)", 0},
		{"one", 1},
		{"large", 1 << 40},
		{"largest exact in float64", 1 << 53},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			body, err := json.Marshal(kuma.ErrorReply{Error: kuma.VersionConflict(0, tc.actual)})
			if err != nil {
				t.Fatal(err)
			}
			var reply kuma.ErrorReply
			if err := json.Unmarshal(body, &reply); err != nil {
				t.Fatalf("unmarshal %s: %v", body, err)
			}
			if reply.Error == nil {
				t.Fatalf("got no error in %s", body)
			}
			if v, isFloat := reply.Error.Details["actual_version"].(float64); !isFloat {
				t.Fatalf("got actual_version %T after decoding, want float64", reply.Error.Details["actual_version"])
			} else if v != float64(tc.actual) {
				t.Fatalf("got actual_version %v, want %d", v, tc.actual)
			}
			got, ok := reply.Error.ActualVersion()
			if !ok || got != tc.actual {
				t.Fatalf("ActualVersion() after round trip of %s: got (%d, %v), want (%d, true)", body, got, ok, tc.actual)
			}
			if !errors.Is(reply.Error, kuma.ErrVersionConflict) {
				t.Fatalf("errors.Is(decoded, ErrVersionConflict): got false, want true")
			}
		})
	}
}

func TestErrorReplyWireShape(t *testing.T) {
	body, err := json.Marshal(kuma.ErrorReply{Error: kuma.VersionConflict(1, 2)})
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]map[string]any
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("unmarshal %s: %v", body, err)
	}
	e := got["error"]
	if e["code"] != "version_conflict" {
		t.Errorf("got code %v, want version_conflict in %s", e["code"], body)
	}
	if _, ok := e["message"].(string); !ok {
		t.Errorf("got message %v, want a string in %s", e["message"], body)
	}
	details, _ := e["details"].(map[string]any)
	if details["actual_version"] != float64(2) {
		t.Errorf("got details %v, want actual_version 2 in %s", e["details"], body)
	}

	// No details: the field is omitted.
	body, err = json.Marshal(kuma.ErrorReply{Error: &kuma.Error{Code: kuma.CodeNotFound, Message: "m"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"error":{"code":"not_found","message":"m"}}`; string(body) != want {
		t.Errorf("got %s, want %s", body, want)
	}
}

func TestActualVersionAbsent(t *testing.T) {
	tests := []struct {
		name string
		err  *kuma.Error
	}{
		{"other code", &kuma.Error{Code: kuma.CodeNotFound, Details: map[string]any{"actual_version": int64(3)}}},
		{"no details", &kuma.Error{Code: kuma.CodeVersionConflict}},
		{"details without the key", &kuma.Error{Code: kuma.CodeVersionConflict, Details: map[string]any{"x": 1}}},
		{"string value", &kuma.Error{Code: kuma.CodeVersionConflict, Details: map[string]any{"actual_version": "3"}}},
		{"sentinel", kuma.ErrVersionConflict},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got, ok := tc.err.ActualVersion(); ok {
				t.Fatalf("ActualVersion(): got (%d, true), want (_, false)", got)
			}
		})
	}
}

func TestActualVersionGoTypes(t *testing.T) {
	for _, v := range []any{int64(7), int(7), float64(7)} {
		e := &kuma.Error{Code: kuma.CodeVersionConflict, Details: map[string]any{"actual_version": v}}
		if got, ok := e.ActualVersion(); !ok || got != 7 {
			t.Errorf("ActualVersion() with %T: got (%d, %v), want (7, true)", v, got, ok)
		}
	}
}

func TestAsError(t *testing.T) {
	t.Run("kuma error is returned as is", func(t *testing.T) {
		orig := kuma.Errorf(kuma.CodeNotFound, "entity x was never written")
		if got := kuma.AsError(orig); got != orig {
			t.Fatalf("got %v, want the same *Error %v", got, orig)
		}
		if got := kuma.AsError(fmt.Errorf("ctx: %w", orig)); got != orig {
			t.Fatalf("through wrapping: got %v, want the same *Error %v", got, orig)
		}
	})
	t.Run("other errors are internal and hidden", func(t *testing.T) {
		secret := errors.New("open /var/lib/kuma/shard-3.db: permission denied")
		got := kuma.AsError(fmt.Errorf("store: %w", secret))
		if got.Code != kuma.CodeInternal {
			t.Fatalf("got code %q, want %q", got.Code, kuma.CodeInternal)
		}
		if strings.Contains(got.Error(), "shard-3") || strings.Contains(got.Error(), "permission") {
			t.Fatalf("got %q, want the internal text hidden", got.Error())
		}
		if got.Details != nil {
			t.Fatalf("got details %v, want none", got.Details)
		}
		if got.Code.Status() != 500 {
			t.Fatalf("got status %d, want 500", got.Code.Status())
		}
	})
}

func TestErrorCode(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want kuma.Code
	}{
		{"nil", nil, ""},
		{"kuma", kuma.ErrTimeout, kuma.CodeTimeout},
		{"wrapped", fmt.Errorf("x: %w", kuma.ErrUnavailable), kuma.CodeUnavailable},
		{"other", io.ErrUnexpectedEOF, kuma.CodeInternal},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := kuma.ErrorCode(tc.err); got != tc.want {
				t.Fatalf("ErrorCode(%v): got %q, want %q", tc.err, got, tc.want)
			}
		})
	}
}

// CodeForStatus is Status reversed: every code whose number is its own
// comes back, the shared 400 gives the general bad_request, and a number no
// code has is internal.
func TestCodeForStatus(t *testing.T) {
	for _, tc := range protocolCodes {
		want := tc.code
		if tc.status == 400 {
			want = kuma.CodeBadRequest
		}
		if got := kuma.CodeForStatus(tc.status); got != want {
			t.Errorf("CodeForStatus(%d): got %q, want %q", tc.status, got, want)
		}
	}
	for _, n := range []int{0, 200, 418, 502} {
		if got := kuma.CodeForStatus(n); got != kuma.CodeInternal {
			t.Errorf("CodeForStatus(%d): got %q, want internal", n, got)
		}
	}
}
