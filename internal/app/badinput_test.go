package app_test

import (
	"encoding/json"
	"testing"
	"unicode/utf8"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestProtocolRefusesWhatStrictParsersCannotRead sends, with plain NATS
// requests as a client in another language would (the Go client never
// writes such bytes), bodies that encoding/json accepts but that would be
// stored and then read back as JSON a strict parser refuses or reads
// differently: bytes that are not UTF-8, duplicate keys, lone surrogates,
// numbers beyond a double; and times an int64 of nanoseconds cannot hold.
// Each answers its protocol code with the error headers and changes
// nothing: the entity, its history, the stream and the entities read model
// are as before, and every answer is valid UTF-8.
func TestProtocolRefusesWhatStrictParsersCannotRead(t *testing.T) {
	n := kumatest.Start(t, nil)
	nc := n.NC
	const id = "strict-1"
	var a kuma.AppendReply
	wantOK(t, request(t, nc, "kuma.default.append."+id, `{"events":[{"type":"Set","data":{"name":"ok"}}]}`), &a)

	const bad, inv = kuma.CodeBadRequest, kuma.CodeInvalidEvent
	for _, tc := range []struct {
		name, subject, body string
		code                kuma.Code
	}{
		{"append data not UTF-8", "append", "{\"events\":[{\"type\":\"Set\",\"data\":{\"s\":\"\xff\xfe\"}}]}", bad},
		{"append key not UTF-8", "append", "{\"events\":[{\"type\":\"Set\",\"data\":{\"\xc3(\":1}}]}", bad},
		{"append idempotency key not UTF-8", "append", "{\"events\":[{\"type\":\"Set\"}],\"idempotency_key\":\"k\xff\"}", bad},
		{"append events twice", "append", `{"events":[{"type":"Set","data":{"s":"x"}}],"events":[{"type":"Set","data":{"s":"y"}}]}`, bad},
		{"append event type twice", "append", `{"events":[{"type":"Set","type":"Other"}]}`, bad},
		{"append data key twice", "append", `{"events":[{"type":"Set","data":{"s":"x","s":"y"}}]}`, inv},
		{"append nested data key twice", "append", `{"events":[{"type":"Set","data":{"a":{"s":1, "s" :2}}}]}`, inv},
		{"append lone surrogate", "append", `{"events":[{"type":"Set","data":{"s":"\ud800"}}]}`, inv},
		{"append 1e400", "append", `{"events":[{"type":"Set","data":{"n":1e400}}]}`, inv},
		{"read at_time 2263", "read", `{"at_time":"2263-01-01T00:00:00Z"}`, bad},
		{"read at_time 1677", "read", `{"at_time":"1677-01-01T00:00:00Z"}`, bad},
		{"read key twice", "read", `{"at_version":1,"at_version":1}`, bad},
		{"read not UTF-8", "read", "\xff", bad},
		{"history key twice", "history", `{"limit":1,"limit":2}`, bad},
		{"export body not UTF-8", "export", "{\"\xff\":1}", bad},
		{"forget reason not UTF-8", "forget", "{\"reason\":\"GDPR \xff\"}", bad},
		{"forget reason twice", "forget", `{"reason":"a","reason":"b"}`, bad},
		{"forget lone surrogate", "forget", `{"reason":"\udc00"}`, bad},
		{"query param twice", "kuma.default.query.entities", `{"params":{"prefix":"strict-","prefix":"x"}}`, bad},
		{"query not UTF-8", "kuma.default.query.entities", "{\"params\":{\"prefix\":\"\xfe\"}}", bad},
		{"status not UTF-8", "kuma.default.status", "{\"\xff\":1}", bad},
		{"migrate key twice", "kuma.default.shard.migrate", `{"shard":0,"to":"x","shard":1}`, bad},
		{"skip not UTF-8", "kuma.default.projection.skip.entities", "{\"position\":\"\xff\"}", bad},
		{"rebuild with a body", "kuma.default.projection.rebuild.entities", `{"from":"\ud800"}`, bad},
		{"retry key twice", "kuma.default.projection.retry.entities", `{"a":1,"a":2}`, bad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			subject := tc.subject
			if kuma.ValidateEntityID(subject) == nil { // an entity op
				subject = "kuma.default." + subject + "." + id
			}
			msg := request(t, nc, subject, tc.body)
			if !utf8.Valid(msg.Data) || !json.Valid(msg.Data) {
				t.Fatalf("the answer is not valid UTF-8 JSON: %q", msg.Data)
			}
			wantError(t, msg, tc.code)
			var r kuma.ReadReply
			wantOK(t, request(t, nc, "kuma.default.read."+id, ""), &r)
			if r.Version != 1 || string(r.State) != `{"name":"ok"}` {
				t.Fatalf("after a refused request the entity is at version %d with %s", r.Version, r.State)
			}
		})
	}

	// One more good append, then everything a reader sees holds the two
	// good events and nothing else: history, export and the read model
	// (queried once it has applied the last append).
	wantOK(t, request(t, nc, "kuma.default.append."+id, `{"events":[{"type":"Set","data":{"name":"still ok"}}]}`), &a)
	var h kuma.HistoryReply
	wantOK(t, request(t, nc, "kuma.default.history."+id, ""), &h)
	if len(h.Events) != 2 || string(h.Events[0].Data) != `{"name":"ok"}` || string(h.Events[1].Data) != `{"name":"still ok"}` {
		t.Fatalf("history = %+v, want the two good events only", h.Events)
	}
	var ex kuma.ExportReply
	wantOK(t, request(t, nc, "kuma.default.export."+id, ""), &ex)
	if ex.Version != 2 || len(ex.Events) != 2 {
		t.Fatalf("export = version %d with %d events, want 2 and 2", ex.Version, len(ex.Events))
	}
	var q kuma.QueryReply
	wantOK(t, request(t, nc, "kuma.default.query.entities", `{"params":{"prefix":"strict-"},"after":"`+a.Position+`","wait_ms":5000}`), &q)
	if len(q.Rows) != 1 || q.Rows[0]["version"] != float64(2) {
		t.Fatalf("entities rows = %v, want %s at version 2", q.Rows, id)
	}
	if st, _ := json.Marshal(q.Rows[0]["state"]); string(st) != `{"name":"still ok"}` {
		t.Fatalf("entities state = %s", st)
	}
}
