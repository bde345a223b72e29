package app_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go"
)

// These tests hold that every answer arrives, however large what it answers
// about: a reply over the NATS max payload cannot be published, so pages are
// cut by size and what cannot fit at all answers payload_too_large. Before
// the fix each of these requests went unanswered; the short timeouts make
// that a quick failure.

// bigTimeout is how long a test waits for one answer.
const bigTimeout = 5 * time.Second

// ask sends one request and fails the test when no answer comes: the
// failure the size cut fixes.
func ask(t *testing.T, nc *nats.Conn, subject string, body any) *nats.Msg {
	t.Helper()
	b, ok := body.(json.RawMessage) // sent as it is, not re-encoded
	if !ok {
		var err error
		if b, err = json.Marshal(body); err != nil {
			t.Fatal(err)
		}
	}
	msg, err := nc.Request(subject, b, bigTimeout)
	if err != nil {
		t.Fatalf("request %s: %v (an answer larger than the max payload is dropped)", subject, err)
	}
	if int64(len(msg.Data)) > nc.MaxPayload() {
		t.Fatalf("%s: reply of %d bytes is over the max payload %d", subject, len(msg.Data), nc.MaxPayload())
	}
	return msg
}

// padded is event data of about size bytes that names its version.
func padded(v, size int) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{"v":%d,"pad":"%s"}`, v, strings.Repeat("x", size)))
}

// TestHistoryPagesBySize asks for 200 events of 60 KB (12 MB, past the
// default 8 MiB max payload) in one page and follows next_version: every
// page fits, and together they hold every event exactly once, in order.
func TestHistoryPagesBySize(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	const id, events, size = "big-history", 200, 60_000
	for first := 1; first <= events; first += 50 {
		batch := make([]kuma.EventInput, 50)
		for i := range batch {
			batch[i] = kuma.EventInput{Type: "Padded", Data: padded(first+i, size)}
		}
		if _, err := c.Append(t.Context(), id, batch); err != nil {
			t.Fatal(err)
		}
	}

	seen := map[int64]int{}
	pages := 0
	from := int64(1)
	for {
		var page kuma.HistoryReply
		wantOK(t, ask(t, n.NC, "kuma.default.history."+id, kuma.HistoryRequest{FromVersion: from, Limit: events}), &page)
		pages++
		if len(page.Events) == 0 {
			t.Fatalf("page from version %d holds no event (next_version %v)", from, page.NextVersion)
		}
		for i, e := range page.Events {
			if want := from + int64(i); e.Version != want {
				t.Fatalf("page from %d: event %d has version %d, want %d", from, i, e.Version, want)
			}
			var d struct{ V int64 }
			if err := json.Unmarshal(e.Data, &d); err != nil || d.V != e.Version {
				t.Fatalf("event %d carries data of version %d (%v)", e.Version, d.V, err)
			}
			seen[e.Version]++
		}
		if page.NextVersion == nil {
			break
		}
		if got, want := *page.NextVersion, from+int64(len(page.Events)); got != want {
			t.Fatalf("next_version = %d, want %d", got, want)
		}
		from = *page.NextVersion
	}
	if pages < 2 {
		t.Fatalf("%d events of %d bytes came in %d page, want the page cut by size", events, size, pages)
	}
	for v := int64(1); v <= events; v++ {
		if seen[v] != 1 {
			t.Fatalf("version %d came %d times, want once", v, seen[v])
		}
	}

	// The Go client follows the continuation: one call, the 200 asked for.
	h, err := c.History(t.Context(), id, 1, events)
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Events) != events || h.NextVersion != nil || h.Events[events-1].Version != events {
		t.Fatalf("client History = %d events (next %v), want all %d", len(h.Events), h.NextVersion, events)
	}
	h, err = c.History(t.Context(), id, 11, 150)
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Events) != 150 || h.Events[0].Version != 11 || h.NextVersion == nil || *h.NextVersion != 161 {
		t.Fatalf("client History from 11 limit 150 = %d events from %d, next %v; want 150 from 11, next 161",
			len(h.Events), h.Events[0].Version, h.NextVersion)
	}
}

// smallPayload is the max payload of the tests below, small so that a few
// events make a state no answer can carry.
const smallPayload = 256 << 10

// TestHugeStateAnswersPayloadTooLarge grows an entity's state past the max
// payload: read and export answer payload_too_large with what to do,
// counted under that code; read at_version and history still work; the
// entities query of that one row answers payload_too_large too.
func TestHugeStateAnswersPayloadTooLarge(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.NATS.MaxPayload = smallPayload
		c.MetricsListen = "127.0.0.1:0"
	})
	c := n.Client(client.Options{})
	const id = "huge-state"
	var last *kuma.AppendReply
	for i := 1; i <= 6; i++ {
		// Each event adds a key of 50 KB: the state passes 256 KiB at
		// the sixth.
		data := json.RawMessage(fmt.Sprintf(`{"k%d":"%s"}`, i, strings.Repeat("y", 50_000)))
		var err error
		if last, err = c.Append(t.Context(), id, []kuma.EventInput{{Type: "Grown", Data: data}}); err != nil {
			t.Fatal(err)
		}
	}

	e := wantError(t, ask(t, n.NC, "kuma.default.read."+id, struct{}{}), kuma.CodePayloadTooLarge)
	if !strings.Contains(e.Message, "history") || !strings.Contains(e.Message, "at_version") {
		t.Fatalf("read error %q does not say what to do (page history, or read at_version)", e.Message)
	}
	e = wantError(t, ask(t, n.NC, "kuma.default.export."+id, struct{}{}), kuma.CodePayloadTooLarge)
	if !strings.Contains(e.Message, "history") {
		t.Fatalf("export error %q does not say to page history", e.Message)
	}
	var r kuma.ReadReply
	wantOK(t, ask(t, n.NC, "kuma.default.read."+id, map[string]int{"at_version": 2}), &r)
	if r.Version != 2 {
		t.Fatalf("read at_version 2 = version %d", r.Version)
	}
	var h kuma.HistoryReply
	wantOK(t, ask(t, n.NC, "kuma.default.history."+id, kuma.HistoryRequest{Limit: 100}), &h)
	if len(h.Events) == 0 || len(h.Events) == 6 || h.NextVersion == nil {
		t.Fatalf("history of 6 events of 50 KB under a 256 KiB payload = %d events, next %v; want a cut page", len(h.Events), h.NextVersion)
	}

	// The entities projection holds the whole state as one row.
	var q kuma.QueryReply
	wantOK(t, ask(t, n.NC, "kuma.default.query.entities", kuma.QueryRequest{After: last.Position, Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"nobody"`)}}), &q)
	e = wantError(t, ask(t, n.NC, "kuma.default.query.entities", kuma.QueryRequest{Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"huge-"`)}}), kuma.CodePayloadTooLarge)
	if !strings.Contains(e.Message, id) {
		t.Fatalf("query error %q does not name the row's entity", e.Message)
	}

	f := scrape(t, n.App.MetricsAddr())
	for _, w := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kuma_requests_total", []string{"op", "read", "code", "payload_too_large"}, 1},
		{"kuma_requests_total", []string{"op", "read", "code", "ok"}, 1},
		{"kuma_requests_total", []string{"op", "export", "code", "payload_too_large"}, 1},
		{"kuma_requests_total", []string{"op", "export", "code", "ok"}, -1},
		{"kuma_requests_total", []string{"op", "history", "code", "ok"}, 1},
		{"kuma_projector_requests_total", []string{"op", "query", "code", "payload_too_large"}, 1},
		{"kuma_projector_requests_total", []string{"op", "query", "code", "ok"}, 1},
	} {
		if got := value(f, w.name, w.labels...); got != w.want {
			t.Errorf("%s%v = %v, want %v", w.name, w.labels, got, w.want)
		}
	}
}

// TestEventTooLargeForAnyReply stores one event that no reply can carry:
// under the event limit, but '<' comes out as \u003c in JSON, six bytes for
// one. History and read answer payload_too_large rather than nothing, and
// the events before it still page.
func TestEventTooLargeForAnyReply(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.NATS.MaxPayload = smallPayload })
	c := n.Client(client.Options{})
	const id = "angle-brackets"
	if _, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Small", Data: json.RawMessage(`{"a":1}`)}}); err != nil {
		t.Fatal(err)
	}
	// Sent as raw bytes: the Go client's encoder would escape the '<'
	// already, and the request would be over the max payload.
	var a kuma.AppendReply
	wantOK(t, ask(t, n.NC, "kuma.default.append."+id, json.RawMessage(`{"events":[{"type":"Html","data":{"html":"`+strings.Repeat("<", 60_000)+`"}}]}`)), &a)
	var h kuma.HistoryReply
	wantOK(t, ask(t, n.NC, "kuma.default.history."+id, kuma.HistoryRequest{Limit: 10}), &h)
	if len(h.Events) != 1 || h.NextVersion == nil || *h.NextVersion != 2 {
		t.Fatalf("history = %d events, next %v; want event 1 and next_version 2", len(h.Events), h.NextVersion)
	}
	e := wantError(t, ask(t, n.NC, "kuma.default.history."+id, kuma.HistoryRequest{FromVersion: 2}), kuma.CodePayloadTooLarge)
	if !strings.Contains(e.Message, "max_payload") {
		t.Fatalf("history error %q does not say what to do (raise the max payload)", e.Message)
	}
	wantError(t, ask(t, n.NC, "kuma.default.read."+id, struct{}{}), kuma.CodePayloadTooLarge)
	if code := ask(t, n.NC, "kuma.default.read."+id, map[string]int{"at_version": 1}).Header.Get(natsbus.HeaderErrorCode); code != "" {
		t.Fatalf("read at_version 1 answered error %s", code)
	}
}

// pageQuery follows a query's next_cursor to the end and counts how often
// each value of column key came, and in how many pages.
func pageQuery(t *testing.T, nc *nats.Conn, projection string, r kuma.QueryRequest, key string) (map[string]int, int) {
	t.Helper()
	seen := map[string]int{}
	pages := 0
	for {
		var q kuma.QueryReply
		wantOK(t, ask(t, nc, "kuma.default.query."+projection, r), &q)
		pages++
		if len(q.Rows) == 0 {
			t.Fatalf("page %d after cursor %q holds no row", pages, r.Cursor)
		}
		for _, row := range q.Rows {
			seen[fmt.Sprint(row[key])]++
		}
		if q.NextCursor == "" {
			return seen, pages
		}
		r.Cursor = q.NextCursor
	}
}

// TestEntitiesQueryPagesBySize writes 20 entities of 50 KB each (1 MB, past
// a 256 KiB max payload) and pages the unfiltered entities query: every
// page fits, next_cursor goes on, and every entity comes exactly once.
func TestEntitiesQueryPagesBySize(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.NATS.MaxPayload = smallPayload })
	c := n.Client(client.Options{})
	const entities = 20
	var positions []string
	for i := 0; i < entities; i++ {
		r, err := c.Append(t.Context(), fmt.Sprintf("wide-%02d", i), []kuma.EventInput{{Type: "Padded", Data: padded(1, 50_000)}})
		if err != nil {
			t.Fatal(err)
		}
		positions = append(positions, r.Position)
	}
	// Wait for the projection with filtered queries, which answered
	// before the fix too.
	for _, p := range positions {
		var q kuma.QueryReply
		wantOK(t, ask(t, n.NC, "kuma.default.query.entities", kuma.QueryRequest{After: p, Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"nobody"`)}}), &q)
	}

	seen, pages := pageQuery(t, n.NC, "entities", kuma.QueryRequest{Limit: 100}, "entity")
	if pages < 2 {
		t.Fatalf("%d entities of 50 KB came in %d page under a %d-byte payload", entities, pages, smallPayload)
	}
	if len(seen) != entities {
		t.Fatalf("query returned %d entities, want %d", len(seen), entities)
	}
	for id, k := range seen {
		if k != 1 {
			t.Fatalf("entity %s came %d times, want once", id, k)
		}
	}
}

// TestDeclaredQueryPagesBySize pages a declared projection's named query
// whose rows together are past the max payload: every page fits and every
// row comes once.
func TestDeclaredQueryPagesBySize(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.NATS.MaxPayload = smallPayload
		c.Projections = []projection.Spec{{
			Name:    "notes",
			Tables:  []string{`CREATE TABLE notes (entity TEXT NOT NULL, v INTEGER NOT NULL, pad TEXT NOT NULL)`},
			On:      map[string]string{"Padded": `INSERT INTO notes (entity, v, pad) VALUES (:entity, :v, :pad)`},
			Queries: map[string]projection.Query{"all": {SQL: `SELECT entity, v, pad FROM notes ORDER BY v`}},
		}}
	})
	c := n.Client(client.Options{})
	const notes = 12
	var last *kuma.AppendReply
	for i := 1; i <= notes; i++ {
		var err error
		if last, err = c.Append(t.Context(), "noted", []kuma.EventInput{{Type: "Padded", Data: padded(i, 50_000)}}); err != nil {
			t.Fatal(err)
		}
	}
	// 600 KB of events to apply first: on a busy machine that takes longer
	// than the default wait.
	wait := 4_000 // under bigTimeout, so a late projection is answered timeout, not dropped
	seen, pages := pageQuery(t, n.NC, "notes", kuma.QueryRequest{Query: "all", Limit: 100, After: last.Position, WaitMS: &wait}, "v")
	if pages < 2 || len(seen) != notes {
		t.Fatalf("%d rows of 50 KB came in %d pages with %d distinct rows, want %d rows over several pages", notes, pages, len(seen), notes)
	}
	for v, k := range seen {
		if k != 1 {
			t.Fatalf("row %v came %d times, want once", v, k)
		}
	}
}
