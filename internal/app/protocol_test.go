package app_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go"
)

// These tests speak the wire protocol with plain NATS requests, as a client
// in any language would: subjects, JSON bodies and error headers.

func request(t *testing.T, nc *nats.Conn, subject, body string) *nats.Msg {
	t.Helper()
	msg, err := nc.Request(subject, []byte(body), 5*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return msg
}

func wantOK(t *testing.T, msg *nats.Msg, out any) {
	t.Helper()
	if code := msg.Header.Get(natsbus.HeaderErrorCode); code != "" {
		t.Fatalf("%s: got error %s %s: %s", msg.Subject, code, msg.Header.Get(natsbus.HeaderError), msg.Data)
	}
	dec := json.NewDecoder(strings.NewReader(string(msg.Data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(out); err != nil {
		t.Fatalf("decode reply %s: %v", msg.Data, err)
	}
}

// wantError checks both halves of an error reply: the NATS service headers
// and the JSON body.
func wantError(t *testing.T, msg *nats.Msg, code kuma.Code) *kuma.Error {
	t.Helper()
	if got, want := msg.Header.Get(natsbus.HeaderErrorCode), strconv.Itoa(code.Status()); got != want {
		t.Fatalf("Nats-Service-Error-Code = %q, want %q (body %s)", got, want, msg.Data)
	}
	if msg.Header.Get(natsbus.HeaderError) == "" {
		t.Fatalf("Nats-Service-Error header is empty")
	}
	var body struct {
		Error *kuma.Error `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &body); err != nil || body.Error == nil {
		t.Fatalf("error body %s: %v", msg.Data, err)
	}
	if body.Error.Code != code {
		t.Fatalf("error code = %q, want %q (message %q)", body.Error.Code, code, body.Error.Message)
	}
	if body.Error.Message == "" {
		t.Fatalf("error %s has no message", code)
	}
	return body.Error
}

func TestProtocolHappyPath(t *testing.T) {
	n := kumatest.Start(t, nil)
	nc := n.NC
	const id = "user_0x9A4F"

	var a kuma.AppendReply
	wantOK(t, request(t, nc, "kuma.default.append."+id,
		`{"events":[{"type":"UserCreated","data":{"name":"Dwighson","role":"architect"}}],"expected_version":0,"idempotency_key":"order-7731-attempt"}`), &a)
	if a.Entity != id || a.FirstVersion != 1 || a.LastVersion != 1 || a.Duplicate {
		t.Fatalf("append reply = %+v", a)
	}
	if a.Time.Location() != time.UTC || time.Since(a.Time) > time.Minute {
		t.Fatalf("append time = %v, want a recent UTC time", a.Time)
	}
	pos, err := kuma.ParsePosition(a.Position)
	if err != nil || pos.Shard != placement.ShardOf(id, 4) || pos.Seq != 1 {
		t.Fatalf("position %q = %+v, %v", a.Position, pos, err)
	}

	wantOK(t, request(t, nc, "kuma.default.append."+id,
		`{"events":[{"type":"UserMoved","data":{"city":"Oslo"}},{"type":"RoleDropped","data":{"role":null}},{"type":"Pinged"}],"expected_version":1}`), &a)
	if a.FirstVersion != 2 || a.LastVersion != 4 {
		t.Fatalf("second append = %+v, want versions 2..4", a)
	}

	var r kuma.ReadReply
	wantOK(t, request(t, nc, "kuma.default.read."+id, ""), &r)
	if r.Version != 4 || string(r.State) != `{"city":"Oslo","name":"Dwighson"}` {
		t.Fatalf("read = version %d state %s", r.Version, r.State)
	}
	if r.CreatedAt.After(r.UpdatedAt) || !r.UpdatedAt.Equal(a.Time) {
		t.Fatalf("read times created %v updated %v, want updated = last append %v", r.CreatedAt, r.UpdatedAt, a.Time)
	}
	wantOK(t, request(t, nc, "kuma.default.read."+id, `{"at_version":1}`), &r)
	if r.Version != 1 || string(r.State) != `{"name":"Dwighson","role":"architect"}` {
		t.Fatalf("read at_version 1 = version %d state %s", r.Version, r.State)
	}
	wantOK(t, request(t, nc, "kuma.default.read."+id, `{}`), &r)
	if r.Version != 4 {
		t.Fatalf("read {} = version %d, want 4", r.Version)
	}

	var h kuma.HistoryReply
	wantOK(t, request(t, nc, "kuma.default.history."+id, `{"from_version":1,"limit":3}`), &h)
	if len(h.Events) != 3 || h.Events[0].Version != 1 || h.Events[2].Type != "RoleDropped" || h.NextVersion == nil || *h.NextVersion != 4 {
		t.Fatalf("history page 1 = %+v", h)
	}
	if string(h.Events[1].Data) != `{"city":"Oslo"}` {
		t.Fatalf("history data = %s", h.Events[1].Data)
	}
	wantOK(t, request(t, nc, "kuma.default.history."+id, `{"from_version":4}`), &h)
	if len(h.Events) != 1 || h.NextVersion != nil || string(h.Events[0].Data) != `{}` {
		t.Fatalf("history page 2 = %+v, want version 4 with data {} and next_version null", h)
	}
	raw := request(t, nc, "kuma.default.history."+id, `{"from_version":9}`)
	if !strings.Contains(string(raw.Data), `"next_version":null`) || !strings.Contains(string(raw.Data), `"events":[]`) {
		t.Fatalf("history past the end = %s, want empty events and next_version null", raw.Data)
	}

	var x kuma.ExportReply
	wantOK(t, request(t, nc, "kuma.default.export."+id, ""), &x)
	if x.Version != 4 || len(x.Events) != 4 || string(x.State) != `{"city":"Oslo","name":"Dwighson"}` || x.ExportedAt.IsZero() {
		t.Fatalf("export = %+v", x)
	}
}

// TestProtocolErrors sends every kind of bad request and checks its code and
// that nothing changed: the entity's version and the shard's commit sequence.
func TestProtocolErrors(t *testing.T) {
	n := kumatest.Start(t, nil)
	nc := n.NC
	const id = "acct-1"
	wantOK(t, request(t, nc, "kuma.default.append."+id, `{"events":[{"type":"Opened","data":{"balance":0}}]}`), &kuma.AppendReply{})

	big := `"` + strings.Repeat("x", kuma.DefaultMaxEventBytes) + `"`
	tooMany := `{"events":[` + strings.TrimSuffix(strings.Repeat(`{"type":"E"},`, kuma.DefaultMaxBatch+1), ",") + `]}`
	longID := strings.Repeat("a", 129)
	wrongShard := kuma.ShardSubject("default", (placement.ShardOf(id, 4)+1)%4, kuma.OpAppend, id)

	cases := []struct {
		name, subject, body string
		code                kuma.Code
	}{
		{"malformed JSON", "kuma.default.append." + id, `{"events":[`, kuma.CodeBadRequest},
		{"not an object", "kuma.default.append." + id, `[1,2]`, kuma.CodeBadRequest},
		{"unknown field", "kuma.default.append." + id, `{"events":[{"type":"E"}],"expected":1}`, kuma.CodeBadRequest},
		{"unknown event field", "kuma.default.append." + id, `{"events":[{"type":"E","dta":{}}]}`, kuma.CodeBadRequest},
		{"field name in other case", "kuma.default.append." + id, `{"events":[{"type":"E"}],"Expected_Version":1}`, kuma.CodeBadRequest},
		{"trailing data", "kuma.default.append." + id, `{"events":[{"type":"E"}]} {}`, kuma.CodeBadRequest},
		{"empty body", "kuma.default.append." + id, ``, kuma.CodeBadRequest},
		{"empty batch", "kuma.default.append." + id, `{"events":[]}`, kuma.CodeBadRequest},
		{"oversized batch", "kuma.default.append." + id, tooMany, kuma.CodeBadRequest},
		{"negative expected_version", "kuma.default.append." + id, `{"events":[{"type":"E"}],"expected_version":-1}`, kuma.CodeBadRequest},
		{"long idempotency key", "kuma.default.append." + id, `{"events":[{"type":"E"}],"idempotency_key":"` + strings.Repeat("k", 129) + `"}`, kuma.CodeBadRequest},
		{"bad event type", "kuma.default.append." + id, `{"events":[{"type":"E"},{"type":"1st"}]}`, kuma.CodeInvalidEvent},
		{"missing event type", "kuma.default.append." + id, `{"events":[{"data":{}}]}`, kuma.CodeInvalidEvent},
		{"event type with space", "kuma.default.append." + id, `{"events":[{"type":"A B"}]}`, kuma.CodeInvalidEvent},
		{"oversized event", "kuma.default.append." + id, `{"events":[{"type":"E"},{"type":"E","data":` + big + `}]}`, kuma.CodePayloadTooLarge},
		{"version conflict", "kuma.default.append." + id, `{"events":[{"type":"E"}],"expected_version":5}`, kuma.CodeVersionConflict},
		{"must not exist", "kuma.default.append." + id, `{"events":[{"type":"E"}],"expected_version":0}`, kuma.CodeVersionConflict},
		{"bad entity id", "kuma.default.append.-acct", `{"events":[{"type":"E"}]}`, kuma.CodeInvalidEntityID},
		{"long entity id", "kuma.default.read." + longID, ``, kuma.CodeInvalidEntityID},
		{"read never written", "kuma.default.read.ghost", ``, kuma.CodeNotFound},
		{"history never written", "kuma.default.history.ghost", ``, kuma.CodeNotFound},
		{"export never written", "kuma.default.export.ghost", ``, kuma.CodeNotFound},
		{"read at_version 0", "kuma.default.read." + id, `{"at_version":0}`, kuma.CodeBadRequest},
		{"read past version", "kuma.default.read." + id, `{"at_version":2}`, kuma.CodeNotFound},
		{"read bad time", "kuma.default.read." + id, `{"at_time":"yesterday"}`, kuma.CodeBadRequest},
		{"read before creation", "kuma.default.read." + id, `{"at_time":"2001-01-01T00:00:00Z"}`, kuma.CodeNotFound},
		{"read both", "kuma.default.read." + id, `{"at_version":1,"at_time":"2030-01-01T00:00:00Z"}`, kuma.CodeBadRequest},
		{"read unknown field", "kuma.default.read." + id, `{"version":1}`, kuma.CodeBadRequest},
		{"history limit", "kuma.default.history." + id, `{"limit":1001}`, kuma.CodeBadRequest},
		{"history negative", "kuma.default.history." + id, `{"from_version":-3}`, kuma.CodeBadRequest},
		{"export with body", "kuma.default.export." + id, `{"all":true}`, kuma.CodeBadRequest},
		{"wrong shard, direct", wrongShard, `{"events":[{"type":"E"}]}`, kuma.CodeBadRequest},
		{"unknown op, direct", kuma.ShardSubject("default", placement.ShardOf(id, 4), "frob", id), `{}`, kuma.CodeNotFound},
	}
	seqBefore := totalSeq(n)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := wantError(t, request(t, nc, tc.subject, tc.body), tc.code)
			if tc.code == kuma.CodeVersionConflict {
				if v, ok := e.ActualVersion(); !ok || v != 1 {
					t.Fatalf("actual_version = %v, %v; want 1", v, ok)
				}
			}
			var r kuma.ReadReply
			wantOK(t, request(t, nc, "kuma.default.read."+id, ""), &r)
			if r.Version != 1 || string(r.State) != `{"balance":0}` {
				t.Fatalf("after a refused request the entity is at version %d with %s", r.Version, r.State)
			}
		})
	}
	// A context no router serves is no router's to answer (another
	// deployment may serve it on the same NATS): NATS says no responders.
	if _, err := nc.Request("kuma.nope.read."+id, nil, 5*time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("unknown context: %v, want no responders", err)
	}
	if got := totalSeq(n); got != seqBefore {
		t.Fatalf("refused requests committed events: shard sequences moved from %d to %d", seqBefore, got)
	}
}

func totalSeq(n *kumatest.Node) int64 {
	var total int64
	for _, s := range n.Shardnode().Stats() {
		total += s.Store.LastSeq
	}
	return total
}

func TestProtocolIdempotentRetry(t *testing.T) {
	n := kumatest.Start(t, nil)
	body := `{"events":[{"type":"Paid","data":{"amount":7}},{"type":"Noted"}],"idempotency_key":"order-7731-attempt"}`
	var first, second, third kuma.AppendReply
	wantOK(t, request(t, n.NC, "kuma.default.append.order-7731", body), &first)
	wantOK(t, request(t, n.NC, "kuma.default.append.order-7731", body), &second)
	if first.Duplicate || !second.Duplicate {
		t.Fatalf("duplicate flags: first %v second %v, want false then true", first.Duplicate, second.Duplicate)
	}
	second.Duplicate = false
	if second != first {
		t.Fatalf("retry reply = %+v, want the first reply %+v", second, first)
	}
	// The key is the identity of the attempt: a different body under the
	// same key is still the same attempt, and a different key is a new one.
	wantOK(t, request(t, n.NC, "kuma.default.append.order-7731", `{"events":[{"type":"Other"}],"idempotency_key":"order-7731-attempt","expected_version":0}`), &third)
	if !third.Duplicate || third.LastVersion != 2 {
		t.Fatalf("same key, other body = %+v", third)
	}
	var h kuma.HistoryReply
	wantOK(t, request(t, n.NC, "kuma.default.history.order-7731", ""), &h)
	if len(h.Events) != 2 {
		t.Fatalf("history has %d events after retries, want 2", len(h.Events))
	}
	// Keys are kept for the entity's lifetime: across passivation and restart.
	n.Restart()
	wantOK(t, request(t, n.NC, "kuma.default.append.order-7731", body), &second)
	if !second.Duplicate || second.Position != first.Position {
		t.Fatalf("retry after restart = %+v, want duplicate of %+v", second, first)
	}
}

func TestProtocolRouterIsMicroService(t *testing.T) {
	n := kumatest.Start(t, nil)
	msg := request(t, n.NC, "$SRV.INFO.kuma-router", "")
	var info struct {
		Name      string `json:"name"`
		Version   string `json:"version"`
		Endpoints []struct {
			Subject    string `json:"subject"`
			QueueGroup string `json:"queue_group"`
		} `json:"endpoints"`
	}
	if err := json.Unmarshal(msg.Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.Name != "kuma-router" || info.Version == "" || len(info.Endpoints) < 4 {
		t.Fatalf("micro info = %+v", info)
	}
	feed := false
	for _, e := range info.Endpoints {
		// Only the served context: routers of other contexts share the NATS.
		if e.Subject == kuma.FeedSubject("default") && e.QueueGroup == "kuma-router" {
			feed = true
			continue
		}
		if !strings.HasPrefix(e.Subject, "kuma.default.") || !strings.HasSuffix(e.Subject, ".*") || e.QueueGroup != "kuma-router" {
			t.Fatalf("endpoint %+v, want kuma.default.<op>.* or kuma.default.feed in queue group kuma-router", e)
		}
	}
	if !feed {
		t.Fatalf("no feed endpoint among %+v", info.Endpoints)
	}
}

func TestDataDirWithOtherShardCountIsRefused(t *testing.T) {
	dir := t.TempDir()
	n := kumatest.Start(t, func(c *app.Config) { c.DataDir = dir; c.Shards = 4 })
	n.Stop()
	a, err := app.New(app.Config{DataDir: dir, Shards: 8, NATS: natsbus.ServerConfig{Listen: "127.0.0.1:-1"}})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Start(t.Context())
	if err == nil {
		_ = a.Stop(t.Context())
		t.Fatal("a data dir made with 4 shards started with 8")
	}
	if !strings.Contains(err.Error(), "created with 4 shards") || !strings.Contains(err.Error(), "--shards 4") {
		t.Fatalf("error %q does not say what the data dir has and how to start it", err)
	}
	fmt.Fprintln(testWriter{t}, "refused as expected:", err)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
