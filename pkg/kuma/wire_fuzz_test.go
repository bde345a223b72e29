package kuma_test

import (
	"errors"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

// FuzzDecodeRequests feeds any bytes to every request decoder and its
// validation: nothing panics, and every refusal is a protocol error with a
// code a client can act on (never internal).
func FuzzDecodeRequests(f *testing.F) {
	for _, s := range []string{
		`{"events":[{"type":"Created","data":{"a":1}}],"expected_version":0,"idempotency_key":"k"}`,
		`{"at_version":3}`, `{"at_time":"2026-11-25T14:03:07Z"}`, `{"from_version":2,"limit":10}`,
		`{"reason":"GDPR"}`, `{"query":"q","params":{"a":1},"limit":5,"cursor":"bzE","after":"p1.3.7","wait_ms":100}`,
		`{"position":"p1.0.1"}`, `{"Limit":5}`, `{"events":[{"type":"","data":null}]}`, ``, `[]`, `{"events":[]}x`,
		"{\"reason\":\"\xff\"}", `{"limit":1,"limit":2}`, `{"params":{"a":1e400}}`, `{"query":"\udc00"}`,
		`{"at_time":"2263-01-01T00:00:00Z"}`, `{"at_time":"1677-01-01T00:00:00Z"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		check := func(what string, err error) {
			if err == nil {
				return
			}
			var ke *kuma.Error
			if !errors.As(err, &ke) || !ke.Code.Known() || ke.Code == kuma.CodeInternal {
				t.Fatalf("%s: %q gives %v (%T), want a protocol error a client can act on", what, body, err, err)
			}
		}
		var a kuma.AppendRequest
		if err := kuma.Decode(body, &a); err != nil {
			check("append decode", err)
		} else {
			check("append validate", a.Validate(kuma.Limits{}))
		}
		var r kuma.ReadRequest
		if err := kuma.Decode(body, &r); err != nil {
			check("read decode", err)
		} else {
			check("read validate", r.Validate())
		}
		var h kuma.HistoryRequest
		if err := kuma.Decode(body, &h); err != nil {
			check("history decode", err)
		} else {
			check("history validate", h.Validate())
		}
		var fr kuma.ForgetRequest
		check("forget decode", kuma.Decode(body, &fr))
		var q kuma.QueryRequest
		if err := kuma.Decode(body, &q); err != nil {
			check("query decode", err)
		} else {
			_, _, err := q.Validate()
			check("query validate", err)
		}
		var s kuma.SkipRequest
		check("skip decode", kuma.Decode(body, &s))
	})
}
