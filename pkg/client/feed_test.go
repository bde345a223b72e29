package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// feedLog checks what a follower saw: every entity's events exactly once,
// in version order, with the data that was appended.
type feedLog struct {
	mu   sync.Mutex
	seen map[string][]int64
	n    int
}

func (l *feedLog) add(t *testing.T, e kuma.FeedEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen == nil {
		l.seen = map[string][]int64{}
	}
	vs := l.seen[e.Entity]
	if len(vs) > 0 && e.Version <= vs[len(vs)-1] {
		t.Errorf("%s: version %d after %d", e.Entity, e.Version, vs[len(vs)-1])
	}
	var d struct{ V int64 }
	if err := json.Unmarshal(e.Data, &d); err != nil || d.V != e.Version || e.Type != "Counted" {
		t.Errorf("%s v%d: type %s data %s", e.Entity, e.Version, e.Type, e.Data)
	}
	l.seen[e.Entity] = append(vs, e.Version)
	l.n++
}

// complete reports whether every entity of want has exactly versions 1..v.
func (l *feedLog) complete(want map[string]int64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, v := range want {
		vs := l.seen[id]
		if int64(len(vs)) != v {
			return fmt.Errorf("%s: saw %d events, want %d", id, len(vs), v)
		}
		for i, x := range vs {
			if x != int64(i+1) {
				return fmt.Errorf("%s: event %d is version %d", id, i, x)
			}
		}
	}
	for id := range l.seen {
		if _, ok := want[id]; !ok {
			return fmt.Errorf("saw %s, which was not written (or was forgotten)", id)
		}
	}
	return nil
}

func appendCounted(t *testing.T, c *client.Client, id string, want map[string]int64) *kuma.AppendReply {
	t.Helper()
	want[id]++
	rep, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Counted", Data: json.RawMessage(fmt.Sprintf(`{"v":%d}`, want[id]))}})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// followUntil follows from after until cond holds and returns the cursor.
func followUntil(t *testing.T, c *client.Client, opts client.FollowOptions, log *feedLog, cond func() bool) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	done := errors.New("done")
	if opts.Wait == 0 {
		opts.Wait = 200 * time.Millisecond
	}
	var last string
	opts.Checkpoint = func(next string) error {
		last = next
		if cond() {
			return done
		}
		return nil
	}
	if cond() {
		return opts.After
	}
	_, err := c.Follow(ctx, opts, func(e kuma.FeedEvent) error { log.add(t, e); return nil })
	if !errors.Is(err, done) {
		t.Fatalf("follow ended with %v (saw %d events)", err, log.n)
	}
	return last
}

func TestFeedCatchesUpThenFollowsAndResumes(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	want := map[string]int64{}
	for i := range 120 {
		appendCounted(t, c, fmt.Sprintf("feed-%d", i%17), want)
	}
	// Catch up in small pages, stopping half-way with a checkpoint.
	var first feedLog
	mid := followUntil(t, c, client.FollowOptions{Limit: 7}, &first, func() bool { first.mu.Lock(); defer first.mu.Unlock(); return first.n >= 60 })
	// Resume from the checkpoint: the rest, and nothing twice.
	rest := &feedLog{seen: map[string][]int64{}}
	for id, vs := range first.seen {
		rest.seen[id] = append([]int64(nil), vs...)
	}
	rest.n = first.n
	cur := followUntil(t, c, client.FollowOptions{After: mid, Limit: 7}, rest, func() bool { return rest.complete(want) == nil })
	if err := rest.complete(want); err != nil {
		t.Fatal(err)
	}
	// Live: a follower waiting at the end sees new appends.
	ctx, cancel := context.WithCancel(t.Context())
	got := make(chan kuma.FeedEvent, 16)
	stopped := make(chan error, 1)
	go func() {
		_, err := c.Follow(ctx, client.FollowOptions{After: cur, Wait: 5 * time.Second}, func(e kuma.FeedEvent) error { got <- e; return nil })
		stopped <- err
	}()
	var lat []time.Duration
	for i := range 5 {
		time.Sleep(20 * time.Millisecond) // the follower is waiting
		start := time.Now()
		appendCounted(t, c, "live-1", want)
		select {
		case e := <-got:
			lat = append(lat, time.Since(start))
			if e.Entity != "live-1" || e.Version != int64(i+1) {
				t.Fatalf("live event %s v%d, want live-1 v%d", e.Entity, e.Version, i+1)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a waiting follower did not see a new append")
		}
	}
	cancel()
	if err := <-stopped; !errors.Is(err, context.Canceled) {
		t.Fatalf("follow after cancel: %v", err)
	}
	t.Logf("live: append to delivery %v", lat)
}

func TestFeedFiltersEndAndForget(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	want := map[string]int64{}
	for i := range 40 {
		appendCounted(t, c, fmt.Sprintf("user_%d", i%4), want)
		appendCounted(t, c, fmt.Sprintf("order_%d", i%3), want)
	}
	if _, err := c.Append(t.Context(), "user_0", []kuma.EventInput{{Type: "Renamed", Data: json.RawMessage(`{"name":"x"}`)}}); err != nil {
		t.Fatal(err)
	}
	// prefix: only user_ events; types: only Renamed.
	page, err := c.Feed(t.Context(), kuma.FeedRequest{Prefix: "user_", Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Events) != 41 {
		t.Fatalf("prefix user_: %d events, want 41", len(page.Events))
	}
	for _, e := range page.Events {
		if !strings.HasPrefix(e.Entity, "user_") {
			t.Fatalf("prefix user_ gave %s", e.Entity)
		}
	}
	page, err = c.Feed(t.Context(), kuma.FeedRequest{Types: []string{"Renamed"}})
	if err != nil || len(page.Events) != 1 || page.Events[0].Entity != "user_0" {
		t.Fatalf("types [Renamed]: %+v %v", page, err)
	}
	// The filtered cursor moved past what it skipped: nothing more after it.
	again, err := c.Feed(t.Context(), kuma.FeedRequest{After: page.Next, Types: []string{"Renamed"}})
	if err != nil || len(again.Events) != 0 || again.Next != page.Next {
		t.Fatalf("after the filtered page: %+v %v", again, err)
	}

	// "end": only what comes after.
	end, err := c.Feed(t.Context(), kuma.FeedRequest{After: kuma.FeedEnd})
	if err != nil || len(end.Events) != 0 {
		t.Fatalf("end: %+v %v", end, err)
	}
	appendCounted(t, c, "order_9", want)
	page, err = c.Feed(t.Context(), kuma.FeedRequest{After: end.Next, WaitMS: 2000})
	if err != nil || len(page.Events) != 1 || page.Events[0].Entity != "order_9" {
		t.Fatalf("after end: %+v %v", page, err)
	}

	// A forget in the middle of a catch-up: the entity's events stop
	// appearing, including those not read yet.
	first, err := c.Feed(t.Context(), kuma.FeedRequest{Limit: 10})
	if err != nil || len(first.Events) != 10 {
		t.Fatalf("first page: %+v %v", first, err)
	}
	if _, err := c.Forget(t.Context(), "user_1", "feed test", "test"); err != nil {
		t.Fatal(err)
	}
	var log feedLog
	for _, e := range first.Events {
		if e.Entity == "user_1" {
			continue // shown before the forget
		}
		if e.Type == "Counted" {
			log.add(t, e)
		}
	}
	delete(want, "user_1")
	delete(want, "user_0") // has a Renamed event: checked apart
	cursor := first.Next
	for {
		p, err := c.Feed(t.Context(), kuma.FeedRequest{After: cursor, Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range p.Events {
			if e.Entity == "user_1" {
				t.Fatalf("forgotten user_1 v%d appeared after the forget", e.Version)
			}
			if e.Entity != "user_0" {
				log.add(t, e)
			}
		}
		if len(p.Events) == 0 {
			break
		}
		cursor = p.Next
	}
	if err := log.complete(want); err != nil {
		// user_0's counted events in the first page were not added: the
		// check covers the others.
		if !strings.Contains(err.Error(), "user_0") {
			t.Fatal(err)
		}
	}
}

func TestFeedRefusesBadRequests(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	if _, err := c.Append(t.Context(), "x", []kuma.EventInput{{Type: "T"}}); err != nil {
		t.Fatal(err)
	}
	good, err := c.Feed(t.Context(), kuma.FeedRequest{})
	if err != nil {
		t.Fatal(err)
	}
	foreignCtx := kuma.FeedCursor{Context: "other", After: make([]int64, n.Cfg.Shards)}.String()
	foreignShards := kuma.FeedCursor{Context: "default", After: make([]int64, n.Cfg.Shards+1)}.String()
	for _, tc := range []struct{ name, body string }{
		{"unknown field", `{"afterr":""}`},
		{"wrong case", `{"LIMIT":5}`},
		{"not JSON", `{"limit":`},
		{"limit negative", `{"limit":-1}`},
		{"limit too big", `{"limit":1001}`},
		{"limit zero, written out", `{"limit":0}`},
		{"limit minus zero", `{"limit":-0}`},
		{"wait too long", `{"wait_ms":30001}`},
		{"wait negative", `{"wait_ms":-5}`},
		{"bad prefix", `{"prefix":"a.b"}`},
		{"bad type", `{"types":["9x"]}`},
		{"malformed cursor", `{"after":"nonsense"}`},
		{"edited cursor", `{"after":"` + good.Next[:len(good.Next)-2] + `AA"}`},
		{"position, not a cursor", `{"after":"p1.0.1"}`},
		{"cursor of another context", `{"after":"` + foreignCtx + `"}`},
		{"cursor of another shard count", `{"after":"` + foreignShards + `"}`},
		{"invalid UTF-8", "{\"prefix\":\"\xff\"}"},
	} {
		msg, err := n.NC.Request(kuma.FeedSubject("default"), []byte(tc.body), 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		var er kuma.ErrorReply
		if msg.Header.Get("Nats-Service-Error-Code") != "400" || json.Unmarshal(msg.Data, &er) != nil || er.Error == nil || er.Error.Code != kuma.CodeBadRequest {
			t.Fatalf("%s: answered %s %s, want bad_request", tc.name, msg.Header.Get("Nats-Service-Error-Code"), msg.Data)
		}
		t.Logf("%s: %s", tc.name, er.Error.Message)
	}
	// A publish with a reply in Kuma's namespace gets no answer there.
	sub, err := n.NC.SubscribeSync("kuma.default.events.99")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.NC.PublishRequest(kuma.FeedSubject("default"), "kuma.default.events.99", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if m, err := sub.NextMsg(500 * time.Millisecond); !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("the feed answered into the stream's namespace: %v %s", err, m.Data)
	}
}

func TestFeedPagesFitTheMaxPayload(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	blob := strings.Repeat("y", 60<<10)
	const events = 300
	for i := range events / 100 {
		evs := make([]kuma.EventInput, 100)
		for j := range evs {
			evs[j] = kuma.EventInput{Type: "Big", Data: json.RawMessage(fmt.Sprintf(`{"i":%d,"b":%q}`, i*100+j, blob))}
		}
		if _, err := c.Append(t.Context(), fmt.Sprintf("big-%d", i), evs); err != nil {
			t.Fatal(err)
		}
	}
	max := int(n.NC.MaxPayload())
	seen := map[string]int{}
	cursor, pages := "", 0
	for {
		msg, err := n.NC.Request(kuma.FeedSubject("default"), []byte(`{"limit":1000,"after":"`+cursor+`"}`), 10*time.Second)
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		if len(msg.Data) > max {
			t.Fatalf("page of %d bytes over the max payload %d", len(msg.Data), max)
		}
		var p kuma.FeedReply
		if err := json.Unmarshal(msg.Data, &p); err != nil {
			t.Fatalf("page %d: %v %.200s", pages, err, msg.Data)
		}
		if len(p.Events) == 0 {
			break
		}
		pages++
		for _, e := range p.Events {
			seen[e.Position]++
		}
		cursor = p.Next
	}
	if len(seen) != events || pages < 3 {
		t.Fatalf("%d distinct events over %d pages, want %d over at least 3", len(seen), pages, events)
	}
	for pos, k := range seen {
		if k != 1 {
			t.Fatalf("%s seen %d times", pos, k)
		}
	}
}
