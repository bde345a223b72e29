package app_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
)

// notesProjection counts Noted events (markerEvents).
func notesProjection() projection.Spec {
	return projection.Spec{
		Name:    "notes",
		Tables:  []string{`CREATE TABLE notes (entity TEXT NOT NULL, version INTEGER NOT NULL)`},
		On:      map[string]string{"Noted": `INSERT INTO notes VALUES (:entity, :version)`},
		Queries: map[string]projection.Query{"count": {SQL: `SELECT count(*) AS n FROM notes`}},
	}
}

// TestDiscoveryNeverAnswersIntoReservedSubjects: the $SRV.PING|INFO|STATS
// subjects every Kuma service answers (for `nats micro`), sent with a reply
// subject in the event stream or a NATS API, make no service publish there.
// Before, `$SRV.PING --reply kuma.default.events.1` stored the ping in the
// stream and fenced the shard, and a reply on `...events.1.forgotten` stopped
// every projection. A legitimate discovery request is still answered.
func TestDiscoveryNeverAnswersIntoReservedSubjects(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.Projections = []projection.Spec{notesProjection()}
	})
	c := n.Client(client.Options{})
	ctx := t.Context()
	shards := n.Cfg.Shards
	// One entity per shard, so an append on every shard shows it still
	// takes writes.
	entities := make([]string, shards)
	for i, found := 0, 0; found < shards; i++ {
		e := fmt.Sprintf("guard-%d", i)
		if s := placement.ShardOf(e, shards); entities[s] == "" {
			entities[s], found = e, found+1
		}
	}
	var positions []string
	appendAll := func() {
		t.Helper()
		for _, e := range entities {
			r, err := c.Append(ctx, e, markerEvents(1))
			if err != nil {
				t.Fatalf("append to %s: %v", e, err)
			}
			positions = append(positions, r.Position)
		}
	}
	appendAll()
	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	streamMsgs := func() uint64 {
		t.Helper()
		st, err := js.Stream(ctx, kuma.StreamName("default"))
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Msgs
	}
	kumatest.StreamEvents(t, n.NC, "default", shards)
	before := streamMsgs()

	// Every service, by kind and by id, found the legitimate way.
	ids := map[string]string{}
	for _, name := range []string{"kuma-router", "kuma-shardnode", "kuma-projector", "kuma-keyvault"} {
		msg := request(t, n.NC, "$SRV.PING."+name, "")
		var ping micro.Ping
		if err := json.Unmarshal(msg.Data, &ping); err != nil || ping.Name != name || ping.ID == "" {
			t.Fatalf("$SRV.PING.%s: %q (%v); want its ping", name, msg.Data, err)
		}
		ids[name] = ping.ID
	}

	replies := []string{"kuma.default.events.1", "kuma.default.events.2.forgotten", "$JS.API.x", "$KV.x.y", "$O.x.y", "_kuma.x"}
	// A subscription on every reply subject: anything a service publishes
	// there arrives here (and, for the events subjects, in the stream).
	leaked := make(chan *nats.Msg, 1024)
	for _, r := range replies {
		sub, err := n.NC.ChanSubscribe(r, leaked)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
	}
	if err := n.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	var subjects []string
	for _, verb := range []string{"PING", "INFO", "STATS"} {
		subjects = append(subjects, "$SRV."+verb)
		for name, id := range ids {
			subjects = append(subjects, "$SRV."+verb+"."+name, "$SRV."+verb+"."+name+"."+id)
		}
	}
	for _, subj := range subjects {
		for _, r := range replies {
			if err := n.NC.PublishRequest(subj, r, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Each subject once more with an inbox: once these are answered, the
	// requests before them on the same subscriptions have been handled.
	for _, subj := range subjects {
		inbox := n.NC.NewRespInbox()
		sub, err := n.NC.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.NC.PublishRequest(subj, inbox, nil); err != nil {
			t.Fatal(err)
		}
		want := 1
		if subj == "$SRV.PING" || subj == "$SRV.INFO" || subj == "$SRV.STATS" {
			want = len(ids)
		}
		for i := 0; i < want; i++ {
			if _, err := sub.NextMsg(10 * time.Second); err != nil {
				t.Fatalf("%s with an inbox: answer %d of %d: %v", subj, i+1, want, err)
			}
		}
		_ = sub.Unsubscribe()
	}
	if err := n.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-leaked:
		t.Fatalf("a service answered into %s: %.80q", m.Subject, m.Data)
	default:
	}
	if got := streamMsgs(); got != before {
		t.Fatalf("the stream went from %d to %d messages; want nothing new", before, got)
	}

	// Every shard still takes appends, and the projection applies them.
	appendAll()
	wait := 10000
	var q *kuma.QueryReply
	for _, p := range positions { // read-your-writes is per shard
		if q, err = c.Query(ctx, "notes", &kuma.QueryRequest{Query: "count", After: p, WaitMS: &wait}); err != nil {
			t.Fatalf("notes after %s: %v", p, err)
		}
	}
	if q.Rows[0]["n"] != float64(2*shards) {
		t.Fatalf("notes after the probes: %+v; want %d rows", q, 2*shards)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Projections {
		if p.State != "running" {
			t.Fatalf("projection %s is %s (%+v); want running", p.Name, p.State, p.Error)
		}
	}
}

// TestForgedStreamMessageStopsProjectionsVisibly publishes, with a
// connection allowed to, messages into the event stream that no relay
// published: each stops every projection at it, visibly (status stopped
// with the reason, /readyz unready) instead of being retried at ERROR
// forever, applies nothing, and `skip stream:<seq>` moves on, after which
// the real events that came meanwhile are applied.
func TestForgedStreamMessageStopsProjectionsVisibly(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.MetricsListen = "127.0.0.1:0"
		c.Projections = []projection.Spec{notesProjection()}
	})
	c := n.Client(client.Options{})
	ctx := t.Context()
	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	// The forgeries go to a shard the real events do not: a foreign message
	// on a shard's subject also fences that shard's relay (its
	// compare-and-set sees another owner), which is the shardnode's defence,
	// not what this test is about.
	entity := "forged-1"
	shard := (placement.ShardOf(entity, n.Cfg.Shards) + 1) % n.Cfg.Shards
	subject := kuma.EventsSubject("default", shard)
	pos := func(shard int, seq int64) string { return kuma.Position{Shard: shard, Seq: seq}.String() }
	body := func(kctx string, shard int, positions ...string) []byte {
		sm := kuma.StreamMessage{Context: kctx, Shard: shard}
		for i, p := range positions {
			sm.Events = append(sm.Events, kuma.StreamEvent{Entity: entity, Version: int64(100 + i), Position: p, Time: time.Now(), Payload: []byte("sealed?")})
		}
		b, _ := json.Marshal(sm)
		return b
	}
	// The same in format 2 (named by a pseudonym, as format 2 must).
	body2 := func(positions ...string) []byte {
		sm := kuma.StreamMessage{Context: "default", Shard: shard}
		for i, p := range positions {
			sm.Events = append(sm.Events, kuma.StreamEvent{Pseudonym: "forged", Version: int64(100 + i), Position: p, Time: time.Now(), Payload: []byte("sealed?")})
		}
		b, err := kuma.EncodeStreamMessage2(nil, &sm)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	relayHeaders := func(last int64) nats.Header {
		return nats.Header{
			nats.MsgIdHdr:           {fmt.Sprintf("default.%d.%d", shard, last)},
			kuma.HeaderLastPosition: {pos(shard, last)},
		}
	}
	withHeader := func(h nats.Header, k, v string) nats.Header { h.Set(k, v); return h }
	forgeries := []struct {
		name   string
		data   []byte
		header nats.Header
	}{
		{"a $SRV.PING answer", []byte(`{"name":"kuma-router","id":"x","version":"0.1.0","metadata":{},"type":"io.nats.micro.v1.ping_response"}`), nil},
		{"not JSON", []byte(`{"context":`), relayHeaders(1010)},
		{"events without the relay's headers", body("default", shard, pos(shard, 1020)), nil},
		{"a last position that is not the last event's", body("default", shard, pos(shard, 1030), pos(shard, 1031)), relayHeaders(1030)},
		{"the body's shard is not the subject's", body("default", shard+1, pos(shard+1, 1040)), withHeader(relayHeaders(1040), kuma.HeaderLastPosition, pos(shard+1, 1040))},
		{"another context", body("other", shard, pos(shard, 1050)), relayHeaders(1050)},
		{"positions going back", body("default", shard, pos(shard, 1061), pos(shard, 1060)), relayHeaders(1060)},
		{"a message id of other events", body("default", shard, pos(shard, 1070)), withHeader(relayHeaders(1070), nats.MsgIdHdr, "default.0.7")},
		{"an owner epoch the id does not carry", body("default", shard, pos(shard, 1080)), withHeader(relayHeaders(1080), kuma.HeaderOwnerEpoch, "3")},
		{"no events and no epoch claim", body("default", shard), relayHeaders(1090)},
		{"a JSON body marked format 2", body("default", shard, pos(shard, 1100)), withHeader(relayHeaders(1100), kuma.HeaderFormat, "2")},
		{"a format-2 body cut short", body2(pos(shard, 1110))[:20], withHeader(relayHeaders(1110), kuma.HeaderFormat, "2")},
		{"a format-2 body without its header", body2(pos(shard, 1120)), relayHeaders(1120)},
		{"an unknown format", body("default", shard, pos(shard, 1130)), withHeader(relayHeaders(1130), kuma.HeaderFormat, "3")},
		{"format 2, a last position that is not the last event's", body2(pos(shard, 1140), pos(shard, 1141)), withHeader(relayHeaders(1140), kuma.HeaderFormat, "2")},
	}
	waitReady := func(wantCode int, wantText string) { t.Helper(); waitReadyz(t, n, wantCode, wantText) }
	wait := 10000
	appended := 0
	for _, f := range forgeries {
		if _, err := c.Append(ctx, entity, markerEvents(1)); err != nil {
			t.Fatal(err)
		}
		appended++
		waitReady(http.StatusOK, "ready")
		ack, err := js.PublishMsg(ctx, &nats.Msg{Subject: subject, Data: f.data, Header: f.header})
		if err != nil || ack.Duplicate {
			t.Fatalf("%s: publish: %v (duplicate %v)", f.name, err, ack != nil && ack.Duplicate)
		}
		at := fmt.Sprintf("stream:%d", ack.Sequence)
		// Real events after the forgery wait behind it.
		after, err := c.Append(ctx, entity, markerEvents(1))
		if err != nil {
			t.Fatal(err)
		}
		appended++
		var st kuma.ProjectionStatus
		var names []string
		deadline := time.Now().Add(20 * time.Second)
		for {
			all, err := c.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			stopped := 0
			names = names[:0]
			for _, p := range all.Projections {
				names = append(names, p.Name)
				if p.State == "stopped" && p.Error != nil && p.Error.Position == at {
					stopped++
				}
				if p.Name == "notes" {
					st = p
				}
			}
			if stopped == len(all.Projections) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: status %+v; want every projection stopped at %s", f.name, all.Projections, at)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if !strings.Contains(st.Error.Message, "not published by a shard's relay") {
			t.Fatalf("%s: stopped with %q; want the reason", f.name, st.Error.Message)
		}
		waitReady(http.StatusServiceUnavailable, "projection notes is stopped at "+at)
		short := 50
		if _, err := c.Query(ctx, "notes", &kuma.QueryRequest{Query: "count", After: after.Position, WaitMS: &short}); kuma.ErrorCode(err) != kuma.CodeTimeout {
			t.Fatalf("%s: query after the forgery while stopped: %v; want timeout", f.name, err)
		}
		// skip must name the message it stopped at.
		if err := c.SkipProjection(ctx, "notes", "stream:1"); kuma.ErrorCode(err) != kuma.CodeBadRequest {
			t.Fatalf("%s: skip of another message: %v; want bad_request", f.name, err)
		}
		for _, p := range names {
			if err := c.SkipProjection(ctx, p, at); err != nil {
				t.Fatalf("%s: skip %s %s: %v", f.name, p, at, err)
			}
		}
		q, err := c.Query(ctx, "notes", &kuma.QueryRequest{Query: "count", After: after.Position, WaitMS: &wait})
		if err != nil || q.Rows[0]["n"] != float64(appended) {
			t.Fatalf("%s: after the skip: %+v, %v; want the %d real events", f.name, q, err, appended)
		}
		waitReady(http.StatusOK, "ready")
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Projections {
		if p.State != "running" || p.Skipped != int64(len(forgeries)) {
			t.Fatalf("projection %s: %s with %d skipped; want running, %d skipped", p.Name, p.State, p.Skipped, len(forgeries))
		}
	}
}
