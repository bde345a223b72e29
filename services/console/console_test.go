package console_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/services/console"
)

// startConsole runs a console on a free loopback port against a node and
// stops it when the test ends.
func startConsole(t testing.TB, n *kumatest.Node, allowWrites bool, poll time.Duration) *console.Service {
	t.Helper()
	svc, err := console.New(console.Config{
		Context:      n.App.Config().Context,
		Shards:       n.App.Config().Shards,
		Listen:       "127.0.0.1:0",
		AllowWrites:  allowWrites,
		Gatherer:     n.App.Registry(),
		NodeName:     n.App.Config().NodeName,
		PollInterval: poll,
	}, n.NC)
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := svc.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return svc
}

// seed appends the events of user_42: three versions, each changing the
// state, so that every version has its own state.
func seed(t testing.TB, n *kumatest.Node, id string) {
	t.Helper()
	c := n.Client(client.Options{})
	for _, ev := range []kuma.EventInput{
		{Type: "UserCreated", Data: json.RawMessage(`{"name":"Dwighson","role":"intern"}`)},
		{Type: "UserPromoted", Data: json.RawMessage(`{"role":"architect"}`)},
		{Type: "UserMoved", Data: json.RawMessage(`{"city":"Oslo"}`)},
	} {
		if _, err := c.Append(t.Context(), id, []kuma.EventInput{ev}); err != nil {
			t.Fatal(err)
		}
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) decode(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

// errorCode is the protocol code of an error body.
func (r response) errorCode(t testing.TB) kuma.Code {
	t.Helper()
	var e kuma.ErrorReply
	r.decode(t, &e)
	if e.Error == nil {
		t.Fatalf("no error in %s", r.body)
	}
	return e.Error.Code
}

func do(t testing.TB, method, url string, body string, hdr map[string]string) response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{res.StatusCode, res.Header, b}
}

func TestAPIReads(t *testing.T) {
	n := kumatest.Start(t, nil)
	seed(t, n, "user_42")
	con := startConsole(t, n, false, 200*time.Millisecond)
	base := "http://" + con.Addr()

	var info console.Info
	do(t, "GET", base+"/api/info", "", nil).decode(t, &info)
	if info.AllowWrites || info.Shards != 4 || info.Context != "default" {
		t.Errorf("info = %+v, want read-only, 4 shards, context default", info)
	}

	t.Run("status", func(t *testing.T) {
		var smp console.Sample
		deadline := time.Now().Add(10 * time.Second)
		for {
			do(t, "GET", base+"/api/status", "", nil).decode(t, &smp)
			if smp.EventsTotal >= 3 || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if smp.Error != nil {
			t.Fatalf("status error: %v", smp.Error)
		}
		if smp.EventsTotal != 3 || smp.Entities != 1 {
			t.Errorf("events, entities = %d, %d, want 3, 1", smp.EventsTotal, smp.Entities)
		}
		if smp.ShardsOnline != 4 || smp.ShardsTotal != 4 || len(smp.Shards) != 4 {
			t.Errorf("shards online/total = %d/%d (%d listed), want 4/4", smp.ShardsOnline, smp.ShardsTotal, len(smp.Shards))
		}
		if len(smp.Nodes) != 1 {
			t.Errorf("nodes = %v, want one", smp.Nodes)
		}
		if smp.Memory.HeapAlloc == 0 || smp.Memory.Node != n.App.Config().NodeName {
			t.Errorf("memory = %+v, want this process's", smp.Memory)
		}
		// The node runs in this process, so its commit histogram is there.
		if smp.CommitLatency == nil {
			t.Error("no commit latency although the shardnode runs in this process")
		}
		if !hasProjection(smp.Projections, "entities") {
			t.Errorf("projections = %v, want the built-in entities", smp.Projections)
		}
	})

	t.Run("entity at version", func(t *testing.T) {
		for _, tc := range []struct {
			query   string
			version int64
			state   string
		}{
			{"?at_version=1", 1, `{"name":"Dwighson","role":"intern"}`},
			{"?at_version=2", 2, `{"name":"Dwighson","role":"architect"}`},
			{"", 3, `{"city":"Oslo","name":"Dwighson","role":"architect"}`},
			{"?at_time=" + time.Now().Add(time.Hour).UTC().Format(time.RFC3339), 3, `{"city":"Oslo","name":"Dwighson","role":"architect"}`},
		} {
			res := do(t, "GET", base+"/api/entities/user_42"+tc.query, "", nil)
			if res.status != 200 {
				t.Fatalf("%s: status %d: %s", tc.query, res.status, res.body)
			}
			var got kuma.ReadReply
			res.decode(t, &got)
			if got.Version != tc.version || compact(t, got.State) != tc.state {
				t.Errorf("%s: got version %d state %s, want %d %s", tc.query, got.Version, got.State, tc.version, tc.state)
			}
		}
	})

	t.Run("history and export", func(t *testing.T) {
		var h kuma.HistoryReply
		do(t, "GET", base+"/api/entities/user_42/history?from=2&limit=1", "", nil).decode(t, &h)
		if len(h.Events) != 1 || h.Events[0].Type != "UserPromoted" || h.NextVersion == nil || *h.NextVersion != 3 {
			t.Errorf("history page = %+v, want UserPromoted then next 3", h)
		}
		res := do(t, "GET", base+"/api/entities/user_42/export", "", nil)
		if got, want := res.header.Get("Content-Disposition"), `attachment; filename=user_42.json`; got != want {
			t.Errorf("Content-Disposition = %q, want %q", got, want)
		}
		var ex kuma.ExportReply
		res.decode(t, &ex)
		if ex.Version != 3 || len(ex.Events) != 3 {
			t.Errorf("export = version %d, %d events; want 3, 3", ex.Version, len(ex.Events))
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tc := range []struct {
			method, path, body string
			status             int
			code               kuma.Code
		}{
			{"GET", "/api/entities/bad.id", "", 400, kuma.CodeInvalidEntityID},
			{"GET", "/api/entities/has%20space/history", "", 400, kuma.CodeInvalidEntityID},
			{"GET", "/api/entities/user_42?at_version=0", "", 400, kuma.CodeBadRequest},
			{"GET", "/api/entities/user_42?at_time=yesterday", "", 400, kuma.CodeBadRequest},
			{"GET", "/api/entities/user_42/history?limit=5000", "", 400, kuma.CodeBadRequest},
			{"GET", "/api/entities/nobody_here", "", 404, kuma.CodeNotFound},
			{"GET", "/api/nothing", "", 404, kuma.CodeNotFound},
			// Read-only: every change is refused, and says why.
			{"POST", "/api/entities/user_42/forget", `{"confirm":"user_42"}`, 403, kuma.CodeForbidden},
			{"POST", "/api/projections/entities/rebuild", `{}`, 403, kuma.CodeForbidden},
			{"POST", "/api/projections/entities/retry", `{}`, 403, kuma.CodeForbidden},
			{"POST", "/api/projections/entities/skip", `{"position":"p1.0.1"}`, 403, kuma.CodeForbidden},
		} {
			res := do(t, tc.method, base+tc.path, tc.body, map[string]string{console.HeaderConsole: "1"})
			if res.status != tc.status || res.errorCode(t) != tc.code {
				t.Errorf("%s %s = %d %s, want %d %s", tc.method, tc.path, res.status, res.body, tc.status, tc.code)
			}
		}
		res := do(t, "POST", base+"/api/entities/user_42/forget", `{"confirm":"user_42"}`, nil)
		if !strings.Contains(string(res.body), "read-only") {
			t.Errorf("a refused forget says %s; want it to say the console is read-only", res.body)
		}
		if _, err := n.Client(client.Options{}).Read(t.Context(), "user_42"); err != nil {
			t.Errorf("after a refused forget, read: %v", err)
		}
	})

	t.Run("host guard", func(t *testing.T) {
		res := do(t, "GET", base+"/api/info", "", map[string]string{"Host": "attacker.example:9480"})
		if res.status != 403 {
			t.Errorf("a request for another host name = %d, want 403 (DNS rebinding)", res.status)
		}
		if res := do(t, "GET", base+"/api/info", "", map[string]string{"Host": "localhost:9480"}); res.status != 200 {
			t.Errorf("a request for localhost = %d, want 200", res.status)
		}
	})

	t.Run("pages", func(t *testing.T) {
		for _, p := range []string{"/", "/console.js", "/console.css"} {
			if res := do(t, "GET", base+p, "", nil); res.status != 200 || len(res.body) < 100 {
				t.Errorf("GET %s = %d, %d bytes", p, res.status, len(res.body))
			}
		}
	})
}

func TestAPIWrites(t *testing.T) {
	n := kumatest.Start(t, nil)
	seed(t, n, "user_7")
	con := startConsole(t, n, true, 200*time.Millisecond)
	base := "http://" + con.Addr()
	hdr := map[string]string{console.HeaderConsole: "1"}

	for _, tc := range []struct {
		name   string
		body   string
		hdr    map[string]string
		status int
	}{
		{"without the console's header", `{"confirm":"user_7"}`, nil, 403},
		{"from another origin", `{"confirm":"user_7"}`, map[string]string{console.HeaderConsole: "1", "Origin": "http://attacker.example"}, 403},
		{"without confirmation", `{}`, hdr, 400},
		{"confirming another id", `{"confirm":"user_8"}`, hdr, 400},
		{"unknown field", `{"confirm":"user_7","force":true}`, hdr, 400},
	} {
		if res := do(t, "POST", base+"/api/entities/user_7/forget", tc.body, tc.hdr); res.status != tc.status {
			t.Errorf("forget %s = %d %s, want %d", tc.name, res.status, res.body, tc.status)
		}
	}
	if _, err := n.Client(client.Options{}).Read(t.Context(), "user_7"); err != nil {
		t.Fatalf("refused forgets erased the entity: %v", err)
	}

	res := do(t, "POST", base+"/api/entities/user_7/forget", `{"confirm":"user_7","reason":"test"}`, hdr)
	if res.status != 200 {
		t.Fatalf("forget = %d %s", res.status, res.body)
	}
	var fr kuma.ForgetReply
	res.decode(t, &fr)
	if fr.EventsDeleted != 3 {
		t.Errorf("events deleted = %d, want 3", fr.EventsDeleted)
	}
	if _, err := n.Client(client.Options{}).Read(t.Context(), "user_7"); !errors.Is(err, kuma.ErrEntityForgotten) {
		t.Errorf("read after forget: %v, want entity_forgotten", err)
	}
	if res := do(t, "GET", base+"/api/entities/user_7", "", nil); res.status != 410 || res.errorCode(t) != kuma.CodeEntityForgotten {
		t.Errorf("GET forgotten entity = %d %s, want 410 entity_forgotten", res.status, res.body)
	}

	res = do(t, "POST", base+"/api/projections/entities/rebuild", `{}`, hdr)
	var rb kuma.RebuildReply
	res.decode(t, &rb)
	if res.status != 200 || rb.Projection != "entities" {
		t.Errorf("rebuild = %d %s", res.status, res.body)
	}
	if res := do(t, "POST", base+"/api/projections/nope/rebuild", `{}`, hdr); res.status != 404 {
		t.Errorf("rebuild of an unknown projection = %d %s, want 404", res.status, res.body)
	}
	if res := do(t, "POST", base+"/api/projections/entities/skip", `{}`, hdr); res.status != 400 {
		t.Errorf("skip without a position = %d %s, want 400", res.status, res.body)
	}
}

// TestEventStream reads the monitor's Server-Sent Events: the kept samples
// first, then one per poll, with the events counted; and Stop ends an open
// stream instead of waiting for it.
func TestEventStream(t *testing.T) {
	n := kumatest.Start(t, nil)
	con := startConsole(t, n, false, 200*time.Millisecond)
	req, _ := http.NewRequestWithContext(t.Context(), "GET", "http://"+con.Addr()+"/api/events", nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if ct := res.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type = %q", ct)
	}
	events := make(chan [2]string, 64)
	go func() {
		defer close(events)
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(nil, 1<<20)
		var name string
		for sc.Scan() {
			line := sc.Text()
			if v, ok := strings.CutPrefix(line, "event: "); ok {
				name = v
			}
			if v, ok := strings.CutPrefix(line, "data: "); ok {
				events <- [2]string{name, v}
			}
		}
	}()
	next := func() (string, string) {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("the stream ended")
			}
			return ev[0], ev[1]
		case <-time.After(10 * time.Second):
			t.Fatal("no event in 10s")
		}
		return "", ""
	}
	if name, _ := next(); name != "history" {
		t.Fatalf("first event %q, want history", name)
	}
	seed(t, n, "user_sse")
	deadline := time.Now().Add(10 * time.Second)
	for {
		name, data := next()
		if name != "sample" {
			t.Fatalf("event %q, want sample", name)
		}
		var smp console.Sample
		if err := json.Unmarshal([]byte(data), &smp); err != nil {
			t.Fatal(err)
		}
		if smp.EventsTotal >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events_total stays at %d, want 3", smp.EventsTotal)
		}
	}
	stopped := make(chan error, 1)
	go func() { stopped <- con.Stop(context.Background()) }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stop waits for an open event stream")
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  console.Config
		want string
	}{
		{console.Config{}, "Listen is required"},
		{console.Config{Listen: "9480"}, "want host:port"},
		{console.Config{Listen: "127.0.0.1:0", Context: "Bad Context"}, "context"},
	} {
		_, err := console.New(tc.cfg, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error about %q", tc.cfg, err, tc.want)
		}
	}
}

func hasProjection(ps []kuma.ProjectionStatus, name string) bool {
	for _, p := range ps {
		if p.Name == name {
			return true
		}
	}
	return false
}

func compact(t testing.TB, raw json.RawMessage) string {
	t.Helper()
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// ExampleService shows the console beside a running Kuma.
func ExampleService() {
	// nc is a NATS connection to the cluster; the console talks to Kuma
	// only through it.
	svc, err := console.New(console.Config{Listen: "127.0.0.1:9480", Shards: 16}, nil)
	fmt.Println(svc == nil, err)
	// Output: true console: a NATS connection is required
}

// A forget through the console leaves the id nowhere in the logs, of the
// console or of the node (the keyvault's audit line names it by a keyed
// hash). Checked at INFO, the level docs/security.md promises it for:
// DEBUG logs what the transports carry.
func TestForgetLogsNoID(t *testing.T) {
	var logs kumatest.LogBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n := kumatest.Start(t, func(cfg *app.Config) { cfg.Logger = logger })
	const id = "user_zq81x"
	seed(t, n, id)
	svc, err := console.New(console.Config{Context: n.App.Config().Context, Shards: n.App.Config().Shards,
		Listen: "127.0.0.1:0", AllowWrites: true, Gatherer: n.App.Registry(), Logger: logger}, n.NC)
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer svc.Stop(context.Background())
	res := do(t, "POST", "http://"+svc.Addr()+"/api/entities/"+id+"/forget", `{"confirm":"`+id+`","reason":"test"}`,
		map[string]string{console.HeaderConsole: "1"})
	if res.status != 200 {
		t.Fatalf("forget = %d %s", res.status, res.body)
	}
	if !strings.Contains(logs.String(), "entity forgotten") {
		t.Fatalf("no forget in the logs:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), id) {
		t.Fatalf("the logs name the forgotten id:\n%s", logs.String())
	}
}

// TestAPIAnswersTooLarge grows an entity's state past the NATS max payload:
// the console answers 413 with the protocol error for what cannot fit (it
// answered 504 when the reply was lost), and history still pages.
func TestAPIAnswersTooLarge(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.NATS.MaxPayload = 256 << 10 })
	c := n.Client(client.Options{})
	for i := 1; i <= 6; i++ {
		data := json.RawMessage(fmt.Sprintf(`{"k%d":"%s"}`, i, strings.Repeat("y", 50_000)))
		if _, err := c.Append(t.Context(), "huge", []kuma.EventInput{{Type: "Grown", Data: data}}); err != nil {
			t.Fatal(err)
		}
	}
	con := startConsole(t, n, false, time.Second)
	base := "http://" + con.Addr() + "/api/entities/huge"
	for _, url := range []string{base, base + "/export"} {
		r := do(t, "GET", url, "", nil)
		if r.status != http.StatusRequestEntityTooLarge || r.errorCode(t) != kuma.CodePayloadTooLarge {
			t.Errorf("GET %s = %d %s, want 413 payload_too_large", url, r.status, r.body)
		}
	}
	var h kuma.HistoryReply
	r := do(t, "GET", base+"/history?limit=100", "", nil)
	if r.status != http.StatusOK {
		t.Fatalf("history = %d %s", r.status, r.body)
	}
	r.decode(t, &h)
	if len(h.Events) != 6 || h.NextVersion != nil {
		t.Fatalf("history = %d events, next %v; want all 6", len(h.Events), h.NextVersion)
	}
}
