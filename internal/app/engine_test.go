package app_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// ackedEvent identifies an event by who wrote it, so the check below can
// find every acknowledged event exactly once.
type ackedEvent struct {
	Writer int `json:"w"`
	Seq    int `json:"s"`
	Item   int `json:"i"`
}

// readAll pages through an entity's whole history.
func readAll(t *testing.T, c *client.Client, entity string) []kuma.RecordedEvent {
	t.Helper()
	var out []kuma.RecordedEvent
	from := int64(1)
	for {
		h, err := c.History(t.Context(), entity, from, kuma.MaxHistoryLimit)
		if err != nil {
			t.Fatalf("history %s from %d: %v", entity, from, err)
		}
		out = append(out, h.Events...)
		if h.NextVersion == nil {
			return out
		}
		from = *h.NextVersion
	}
}

// TestConcurrentWritersKeepEveryEntityDense runs 200 writers appending
// batches to 1,000 overlapping entities, half through the router and half
// routing by themselves, then checks every entity's versions are 1..n with
// no gap or duplicate and every acknowledged event is there exactly once.
func TestConcurrentWritersKeepEveryEntityDense(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Shardnode.SnapshotEvery = 10 })
	viaRouter := n.Client(client.Options{})
	direct := n.Client(client.Options{DirectShards: n.Cfg.Shards})

	const writers, appendsEach, entities = 200, 10, 1000
	var mu sync.Mutex
	acked := map[string]map[ackedEvent]int64{} // entity → event → version
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := viaRouter
			if w%2 == 1 {
				c = direct
			}
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for s := 0; s < appendsEach; s++ {
				entity := fmt.Sprintf("ent-%d", rng.IntN(entities))
				size := 1 + rng.IntN(5)
				batch := make([]kuma.EventInput, size)
				for i := range batch {
					d, _ := json.Marshal(ackedEvent{w, s, i})
					batch[i] = kuma.EventInput{Type: "Wrote", Data: d}
				}
				rep, err := c.Append(context.Background(), entity, batch)
				if err != nil {
					errs <- fmt.Errorf("writer %d append %d: %w", w, s, err)
					return
				}
				if rep.LastVersion-rep.FirstVersion+1 != int64(size) {
					errs <- fmt.Errorf("writer %d: reply %+v for %d events", w, rep, size)
					return
				}
				mu.Lock()
				if acked[entity] == nil {
					acked[entity] = map[ackedEvent]int64{}
				}
				for i := range batch {
					acked[entity][ackedEvent{w, s, i}] = rep.FirstVersion + int64(i)
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	total := 0
	for entity, want := range acked {
		events := readAll(t, viaRouter, entity)
		if len(events) != len(want) {
			t.Fatalf("%s has %d events, %d were acknowledged", entity, len(events), len(want))
		}
		for i, e := range events {
			if e.Version != int64(i+1) {
				t.Fatalf("%s: event %d has version %d; versions must be 1..n", entity, i, e.Version)
			}
			var id ackedEvent
			if err := json.Unmarshal(e.Data, &id); err != nil {
				t.Fatal(err)
			}
			v, ok := want[id]
			if !ok || v != e.Version {
				t.Fatalf("%s version %d holds %+v, acknowledged at version %d (known %v)", entity, e.Version, id, v, ok)
			}
			delete(want, id)
		}
		total += len(events)
		r, err := viaRouter.Read(t.Context(), entity)
		if err != nil || r.Version != int64(len(events)) {
			t.Fatalf("read %s = %+v, %v; want version %d", entity, r, err, len(events))
		}
	}
	t.Logf("%d entities, %d events, all present once with dense versions", len(acked), total)
}

// TestExpectedVersionRaceHasOneWinner races writers that all expect the same
// version: exactly one wins each round, the others get version_conflict with
// the actual version.
func TestExpectedVersionRaceHasOneWinner(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	const racers, rounds = 50, 5
	for round := int64(0); round < rounds; round++ {
		var wins sync.WaitGroup
		results := make(chan error, racers)
		for r := 0; r < racers; r++ {
			wins.Add(1)
			go func(r int) {
				defer wins.Done()
				_, err := c.Append(t.Context(), "race", []kuma.EventInput{{Type: "Won", Data: json.RawMessage(fmt.Sprintf(`{"by":%d}`, r))}},
					client.ExpectVersion(round))
				results <- err
			}(r)
		}
		wins.Wait()
		close(results)
		won := 0
		for err := range results {
			if err == nil {
				won++
				continue
			}
			var kerr *kuma.Error
			if !errors.Is(err, kuma.ErrVersionConflict) || !errors.As(err, &kerr) {
				t.Fatalf("round %d: loser got %v, want version_conflict", round, err)
			}
			if v, ok := kerr.ActualVersion(); !ok || v != round+1 {
				t.Fatalf("round %d: actual_version = %d, %v; want %d", round, v, ok, round+1)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d writers won, want exactly 1", round, won)
		}
	}
}

// TestTimeTravelEqualsFoldOfFirstN checks read at_version N and at_time
// against an independent fold of the first N events, with snapshots every 7
// events so most reads start from a snapshot.
func TestTimeTravelEqualsFoldOfFirstN(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Shardnode.SnapshotEvery = 7 })
	c := n.Client(client.Options{})
	rng := rand.New(rand.NewPCG(1, 2))
	var inputs []kuma.EventInput
	var times []time.Time
	for i := 0; i < 40; i++ {
		patch := map[string]any{fmt.Sprintf("k%d", rng.IntN(6)): i}
		if rng.IntN(4) == 0 {
			patch[fmt.Sprintf("k%d", rng.IntN(6))] = nil
		}
		if rng.IntN(5) == 0 {
			patch["nested"] = map[string]any{"a": i, "b": map[string]any{"c": i * 2}}
		}
		d, _ := json.Marshal(patch)
		batch := []kuma.EventInput{{Type: "Patched", Data: d}}
		inputs = append(inputs, batch...)
		rep, err := c.Append(t.Context(), "travel", batch)
		if err != nil {
			t.Fatal(err)
		}
		times = append(times, rep.Time)
	}
	for v := 1; v <= len(inputs); v++ {
		want := foldJSON(t, inputs[:v])
		r, err := c.Read(t.Context(), "travel", client.AtVersion(int64(v)))
		if err != nil {
			t.Fatalf("read at version %d: %v", v, err)
		}
		if r.Version != int64(v) || !jsonEqual(t, r.State, want) {
			t.Fatalf("at version %d: got version %d state %s, want %s", v, r.Version, r.State, want)
		}
		if !r.UpdatedAt.Equal(times[v-1]) {
			t.Fatalf("at version %d: updated_at %v, want the event's time %v", v, r.UpdatedAt, times[v-1])
		}
		// The latest version whose time is <= times[v-1].
		wantV := v
		for wantV < len(times) && !times[wantV].After(times[v-1]) {
			wantV++
		}
		r, err = c.Read(t.Context(), "travel", client.AtTime(times[v-1]))
		if err != nil || r.Version != int64(wantV) || !jsonEqual(t, r.State, foldJSON(t, inputs[:wantV])) {
			t.Fatalf("at time of version %d: got %+v, %v; want version %d", v, r, err, wantV)
		}
	}
}

// foldJSON is an independent RFC 7386 fold for checking the server's.
func foldJSON(t *testing.T, events []kuma.EventInput) json.RawMessage {
	var doc any
	for _, e := range events {
		var p any
		if err := json.Unmarshal(e.Data, &p); err != nil {
			t.Fatal(err)
		}
		doc = apply(doc, p)
	}
	b, _ := json.Marshal(doc)
	return b
}

func apply(doc, patch any) any {
	pm, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	dm, ok := doc.(map[string]any)
	out := map[string]any{}
	if ok {
		for k, v := range dm {
			out[k] = v
		}
	}
	for k, v := range pm {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = apply(out[k], v)
		}
	}
	return out
}

func jsonEqual(t *testing.T, a, b json.RawMessage) bool {
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	ax, _ := json.Marshal(x)
	by, _ := json.Marshal(y)
	return string(ax) == string(by)
}

// TestRestartBringsEverythingBack stops the node and starts it again on the
// same data dir: every state, version and position continues.
func TestRestartBringsEverythingBack(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Shardnode.SnapshotEvery = 5 })
	c := n.Client(client.Options{})
	want := map[string]*kuma.ReadReply{}
	for i := 0; i < 50; i++ {
		id := fmt.Sprintf("dev-%d", i)
		for j := 0; j <= i%12; j++ {
			if _, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Reading", Data: json.RawMessage(fmt.Sprintf(`{"t":%d,"n%d":true}`, j, j%3))}}); err != nil {
				t.Fatal(err)
			}
		}
		r, err := c.Read(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		want[id] = r
	}
	seq := totalSeq(n)
	n.Restart()
	if got := totalSeq(n); got != seq {
		t.Fatalf("after restart the shards hold %d events, want %d", got, seq)
	}
	c = n.Client(client.Options{})
	for id, w := range want {
		r, err := c.Read(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		if r.Version != w.Version || string(r.State) != string(w.State) || !r.CreatedAt.Equal(w.CreatedAt) || !r.UpdatedAt.Equal(w.UpdatedAt) {
			t.Fatalf("%s after restart = %+v, want %+v", id, r, w)
		}
	}
	rep, err := c.Append(t.Context(), "dev-3", []kuma.EventInput{{Type: "Reading"}}, client.ExpectVersion(want["dev-3"].Version))
	if err != nil || rep.FirstVersion != want["dev-3"].Version+1 {
		t.Fatalf("append after restart = %+v, %v", rep, err)
	}
}

// TestPassivationAndActorBound: idle actors passivate and come back with the
// same state; with MaxActors small, touching many entities keeps the live
// count bounded.
func TestPassivationAndActorBound(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.Shardnode.IdleTimeout = 50 * time.Millisecond
		c.Shardnode.MaxActors = 8 // 2 per shard
		c.Shardnode.SnapshotEvery = 3
	})
	c := n.Client(client.Options{})
	want := map[string]string{}
	for i := 0; i < 200; i++ {
		id := fmt.Sprintf("p-%d", i)
		if _, err := c.Append(t.Context(), id, []kuma.EventInput{
			{Type: "A", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))},
			{Type: "B", Data: json.RawMessage(`{"b":1}`)},
			{Type: "C", Data: json.RawMessage(`{"b":null,"c":2}`)},
			{Type: "D", Data: json.RawMessage(`{"d":[1,2]}`)},
		}); err != nil {
			t.Fatal(err)
		}
		want[id] = fmt.Sprintf(`{"c":2,"d":[1,2],"i":%d}`, i)
		if live := liveActors(n); live > 8+n.Cfg.Shards { // a busy actor may outlive its turn
			t.Fatalf("after %d entities %d actors are live, want at most about 8", i+1, live)
		}
	}
	var passivated int64
	for _, s := range n.Shardnode().Stats() {
		passivated += s.Passivated
	}
	if passivated < 150 {
		t.Fatalf("%d actors passivated after touching 200 entities with room for 8", passivated)
	}
	// Idle timeout: everything goes once nothing is touched.
	deadline := time.Now().Add(10 * time.Second)
	for liveActors(n) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d actors still live long after the idle timeout", liveActors(n))
		}
		time.Sleep(20 * time.Millisecond)
	}
	for id, w := range want {
		r, err := c.Read(t.Context(), id)
		if err != nil || r.Version != 4 || string(r.State) != w {
			t.Fatalf("%s after reactivation = %+v, %v; want version 4 state %s", id, r, err, w)
		}
	}
	rep, err := c.Append(t.Context(), "p-7", []kuma.EventInput{{Type: "E"}}, client.ExpectVersion(4))
	if err != nil || rep.FirstVersion != 5 {
		t.Fatalf("append after reactivation = %+v, %v", rep, err)
	}
}

func liveActors(n *kumatest.Node) int {
	live := 0
	for _, s := range n.Shardnode().Stats() {
		live += s.LiveActors
	}
	return live
}
