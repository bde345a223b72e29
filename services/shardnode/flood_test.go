package shardnode_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// floodKind is one kind of request in the flood, with the answers it may get.
type floodKind int

const (
	floodUnknownRead   floodKind = iota // read of an id never written
	floodInvalidAppend                  // append to an id the protocol refuses
	floodNewAppend                      // first append of a new entity
	floodHugeAppend                     // append whose event is far over the size limit
)

func (k floodKind) String() string {
	return [...]string{"unknown read", "invalid append", "new append", "huge append"}[k]
}

// floodAllowed lists the answers each kind may get: its own, or unavailable
// (backpressure, which every client may retry). "ok" is a success.
func floodAllowed(k floodKind, code string) bool {
	if code == string(kuma.CodeUnavailable) {
		return true
	}
	switch k {
	case floodUnknownRead:
		return code == string(kuma.CodeNotFound)
	case floodInvalidAppend:
		return code == string(kuma.CodeInvalidEntityID)
	case floodNewAppend:
		return code == "ok"
	case floodHugeAppend:
		return code == string(kuma.CodePayloadTooLarge)
	}
	return false
}

// floodRequest is one request of the flood.
type floodRequest struct {
	kind    floodKind
	entity  string
	subject string
	body    []byte
}

// floodTally counts answers per kind and code, and the requests that got no
// answer at all (a hang) or one they must not get.
type floodTally struct {
	mu           sync.Mutex
	codes        map[string]int
	wrong        []string
	acked        []string // entities whose new append was acknowledged
	hung         atomic.Int64
	answered     atomic.Int64
	noResponders atomic.Int64
}

// floodAnswerLimit is how long one request may wait before it counts as
// hung. It is not a speed requirement: an answer that takes this long under
// a flood bounded to a few thousand requests in flight means one was lost.
const floodAnswerLimit = 30 * time.Second

// floodSend sends reqs with at most flight of them in flight and tallies
// the answers.
func floodSend(ctx context.Context, nc *nats.Conn, reqs func(yield func(floodRequest) bool), flight int, tally *floodTally) {
	sem := make(chan struct{}, flight)
	var wg sync.WaitGroup
	for r := range reqs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(ctx, floodAnswerLimit)
			defer cancel()
			msg, err := nc.RequestMsgWithContext(ctx, &nats.Msg{Subject: r.subject, Data: r.body})
			code := "ok"
			switch {
			case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
				tally.hung.Add(1)
				code = "no answer"
			case natsbus.IsNoResponders(err):
				// Nobody owned the shard at that moment (NATS answers the
				// publisher itself): the client library turns this into
				// unavailable and retries, and so do we here.
				code = string(kuma.CodeUnavailable)
				tally.noResponders.Add(1)
			case err != nil:
				code = "error: " + err.Error()
			default:
				if rerr := natsbus.ReplyError(msg); rerr != nil {
					code = string(kuma.ErrorCode(rerr))
				}
			}
			tally.answered.Add(1)
			tally.mu.Lock()
			defer tally.mu.Unlock()
			tally.codes[r.kind.String()+" → "+code]++
			if r.kind == floodNewAppend && code == "ok" {
				tally.acked = append(tally.acked, r.entity)
			}
			if !floodAllowed(r.kind, code) && len(tally.wrong) < 10 {
				tally.wrong = append(tally.wrong, fmt.Sprintf("%s on %s: %s", r.kind, r.subject, code))
			}
		})
	}
	wg.Wait()
}

// floodLiveActors samples the node's live actors until stop is closed and
// returns the most it saw.
func floodLiveActors(n *kumatest.Node, stop <-chan struct{}) <-chan int {
	out := make(chan int, 1)
	go func() {
		peak := 0
		for {
			live := 0
			for _, st := range n.Shardnode().Stats() {
				live += st.LiveActors
			}
			peak = max(peak, live)
			select {
			case <-stop:
				out <- peak
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return out
}

// floodHeap is the Go heap in use after a full collection.
func floodHeap() uint64 {
	runtime.GC()
	runtime.GC() // the first may leave finalizers' objects for the second
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// floodHeapGrew reports whether the heap grew by more than limit bytes.
func floodHeapGrew(before, after, limit uint64) bool {
	return after > before && after-before > limit
}

const floodMiB = 1 << 20

// floodCounter sums the node's Prometheus samples named name whose labels
// include every pair in labels.
func floodCounter(t *testing.T, n *kumatest.Node, name string, labels ...string) float64 {
	t.Helper()
	families, err := n.App.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metrics:
		for _, m := range f.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, l := range m.GetLabel() {
					found = found || l.GetName() == labels[i] && l.GetValue() == labels[i+1]
				}
				if !found {
					continue metrics
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// TestFloodOfUnknownAndInvalidEntities floods an in-process node, whose
// MaxActors is 1,000, with reads of ids nobody wrote, appends to invalid
// ids (through the router and straight to the shard subjects) and first
// appends of many new entities, with a few thousand requests in flight;
// then with appends whose event is megabytes over the limit. Every request
// is answered, with its kind's code or unavailable; the live actors stay
// within MaxActors; the heap after GC stays within an explicit bound; and a
// normal entity works right afterwards. Negative controls: a request
// answered with another code is flagged, a node with the default MaxActors
// is seen holding more than 1,000 actors, and a retained allocation is seen
// by the heap check.
func TestFloodOfUnknownAndInvalidEntities(t *testing.T) {
	const (
		maxActors = 1_000
		reads     = 60_000
		invalid   = 25_000
		appends   = 15_000
		flight    = 2_000
		huge      = 32
		hugeBytes = 4 * floodMiB
		// heapLimit is generous: the point is that a flood of 100,000
		// requests and 128 MiB of refused payloads leave nothing
		// proportional to them behind.
		heapLimit = 256 * floodMiB
	)
	n := kumatest.Start(t, func(c *app.Config) { c.Shardnode.MaxActors = maxActors })
	ctx := t.Context()
	shards := n.Cfg.Shards

	// Warm up (keyvault, shard files, connections) before the baseline.
	c := n.Client(client.Options{})
	if _, err := c.Append(ctx, "flood-warmup", []kuma.EventInput{{Type: "Warm"}}); err != nil {
		t.Fatal(err)
	}
	before := floodHeap()

	run := strconv.FormatInt(time.Now().UnixNano()%1_000_000, 36)
	badIDs := []func(i int) string{
		func(i int) string { return "-leading-dash-" + strconv.Itoa(i) },
		func(i int) string { return "bang!" + strconv.Itoa(i) },
		func(i int) string { return "_under" + strconv.Itoa(i) },
		func(i int) string { return strings.Repeat("x", 129) + strconv.Itoa(i) },
	}
	newBody := []byte(`{"events":[{"type":"Flooded","data":{"n":1}}]}`)
	flood := func(yield func(floodRequest) bool) {
		total := reads + invalid + appends
		r, v, a := 0, 0, 0
		for i := range total {
			// Interleaved in proportion, so that every kind is in flight
			// at once.
			switch {
			case r*total < i*reads || (v >= invalid && a >= appends):
				id := "ghost-" + run + "-" + strconv.Itoa(r)
				r++
				if !yield(floodRequest{floodUnknownRead, id, kuma.EntitySubject("default", kuma.OpRead, id), nil}) {
					return
				}
			case v*total < i*invalid || a >= appends:
				id := badIDs[v%len(badIDs)](v)
				subject := kuma.EntitySubject("default", kuma.OpAppend, id)
				if v%2 == 1 {
					// Straight to a shard, past the router's own check.
					subject = kuma.ShardSubject("default", v%shards, kuma.OpAppend, id)
				}
				v++
				if !yield(floodRequest{floodInvalidAppend, id, subject, newBody}) {
					return
				}
			default:
				id := "fresh-" + run + "-" + strconv.Itoa(a)
				a++
				if !yield(floodRequest{floodNewAppend, id, kuma.EntitySubject("default", kuma.OpAppend, id), newBody}) {
					return
				}
			}
		}
	}

	stop := make(chan struct{})
	peak := floodLiveActors(n, stop)
	tally := &floodTally{codes: map[string]int{}}
	start := time.Now()
	floodSend(ctx, n.NC, flood, flight, tally)
	floodTook := time.Since(start)
	afterFlood := floodHeap()

	// Payloads far over the event limit (64 KiB), though under the NATS
	// message limit (8 MiB): each must be refused by its actor, and none
	// may stay in memory.
	big := make([]byte, hugeBytes)
	for i := range big {
		big[i] = 'a'
	}
	hugeBody, err := json.Marshal(kuma.AppendRequest{Events: []kuma.EventInput{{Type: "Huge", Data: json.RawMessage(`"` + string(big) + `"`)}}})
	if err != nil {
		t.Fatal(err)
	}
	hugeReqs := func(yield func(floodRequest) bool) {
		for i := range huge {
			id := "huge-" + run + "-" + strconv.Itoa(i)
			if !yield(floodRequest{floodHugeAppend, id, kuma.EntitySubject("default", kuma.OpAppend, id), hugeBody}) {
				return
			}
		}
	}
	start = time.Now()
	floodSend(ctx, n.NC, hugeReqs, 8, tally)
	hugeTook := time.Since(start)
	close(stop)
	livePeak := <-peak
	big, hugeBody = nil, nil
	afterHuge := floodHeap()

	// Over the NATS message limit the client refuses it itself.
	over := make([]byte, 9*floodMiB)
	for i := range over {
		over[i] = 'a'
	}
	_, err = c.Append(ctx, "huge-over-limit", []kuma.EventInput{{Type: "Huge", Data: json.RawMessage(`"` + string(over) + `"`)}})
	if !errors.Is(err, kuma.ErrPayloadTooLarge) {
		t.Errorf("an append over the 8 MiB message limit: %v, want payload_too_large", err)
	}
	over = nil

	sent := int64(reads + invalid + appends + huge)
	t.Logf("flood: %d requests (%d unknown reads, %d invalid appends, %d new appends, %d huge of %d MiB) in %v + %v, %d in flight at most",
		sent, reads, invalid, appends, huge, hugeBytes/floodMiB, floodTook.Round(time.Millisecond), hugeTook.Round(time.Millisecond), flight)
	t.Logf("answers: %v (%d of the unavailable: no responders, a shard briefly unowned)", tally.codes, tally.noResponders.Load())
	t.Logf("live actors at most %d (MaxActors %d); %.0f passivated; %.0f requests refused as unavailable by a shard with every actor busy, %.0f sent again by the router",
		livePeak, maxActors, floodCounter(t, n, "kuma_passivations_total"),
		floodCounter(t, n, "kuma_requests_total", "code", string(kuma.CodeUnavailable)), floodCounter(t, n, "kuma_router_held_total"))
	t.Logf("heap in use after GC: %.1f MiB before, %.1f MiB after the flood, %.1f MiB after the huge payloads (limit +%d MiB)",
		float64(before)/floodMiB, float64(afterFlood)/floodMiB, float64(afterHuge)/floodMiB, heapLimit/floodMiB)

	if got := tally.answered.Load(); got != sent {
		t.Errorf("%d requests finished, %d sent", got, sent)
	}
	if h := tally.hung.Load(); h > 0 {
		t.Errorf("%d requests got no answer within %v", h, floodAnswerLimit)
	}
	if len(tally.wrong) > 0 {
		t.Errorf("answers no request of its kind may get: %v", tally.wrong)
	}
	if tally.codes["unknown read → not_found"] == 0 || tally.codes["invalid append → invalid_entity_id"] == 0 ||
		tally.codes["new append → ok"] == 0 || tally.codes["huge append → payload_too_large"] == 0 {
		t.Errorf("some kind never got its own answer: %v", tally.codes)
	}
	if livePeak > maxActors {
		t.Errorf("live actors reached %d, over MaxActors %d", livePeak, maxActors)
	}
	if floodHeapGrew(before, afterFlood, heapLimit) || floodHeapGrew(before, afterHuge, heapLimit) {
		t.Errorf("the heap grew past the +%d MiB bound", heapLimit/floodMiB)
	}
	// Refused payloads leave nothing behind but connection buffers sized
	// to one message: a node keeping even half of them would be seen.
	if floodHeapGrew(afterFlood, afterHuge, huge*hugeBytes/2) {
		t.Errorf("%d MiB of refused payloads grew the heap by %.1f MiB", huge*hugeBytes/floodMiB, float64(afterHuge-afterFlood)/floodMiB)
	}

	// A normal entity works right afterwards, and the flood's appends are
	// really there.
	if _, err := c.Append(ctx, "flood-survivor", []kuma.EventInput{{Type: "A"}, {Type: "B", Data: json.RawMessage(`{"b":2}`)}}, client.ExpectVersion(0)); err != nil {
		t.Fatalf("append after the flood: %v", err)
	}
	if r, err := c.Read(ctx, "flood-survivor"); err != nil || r.Version != 2 || string(r.State) != `{"b":2}` {
		t.Fatalf("read after the flood: %+v, %v; want version 2 and {\"b\":2}", r, err)
	}
	acked := tally.acked
	if len(acked) == 0 {
		t.Fatal("no new append was acknowledged")
	}
	for _, id := range []string{acked[0], acked[len(acked)/2], acked[len(acked)-1]} {
		if r, err := c.Read(ctx, id); err != nil || r.Version != 1 {
			t.Fatalf("read of %s after the flood: %+v, %v; want version 1", id, r, err)
		}
	}

	floodNegativeControls(t, n)
}

// floodNegativeControls shows that each check above can see a failure.
func floodNegativeControls(t *testing.T, n *kumatest.Node) {
	// A malformed append gets bad_request, which the tally flags.
	tally := &floodTally{codes: map[string]int{}}
	floodSend(t.Context(), n.NC, func(yield func(floodRequest) bool) {
		yield(floodRequest{floodNewAppend, "flood-malformed", kuma.EntitySubject("default", kuma.OpAppend, "flood-malformed"), []byte(`{not json`)})
	}, 1, tally)
	if len(tally.wrong) != 1 {
		t.Errorf("negative control: a malformed append was not flagged: %v", tally.codes)
	}

	// A node with the default MaxActors keeps every reader's actor: the
	// sampler sees more than 1,000.
	open := kumatest.Start(t, nil)
	stop := make(chan struct{})
	peak := floodLiveActors(open, stop)
	tally = &floodTally{codes: map[string]int{}}
	floodSend(t.Context(), open.NC, func(yield func(floodRequest) bool) {
		for i := range 3_000 {
			id := "ghost-" + strconv.Itoa(i)
			if !yield(floodRequest{floodUnknownRead, id, kuma.EntitySubject("default", kuma.OpRead, id), nil}) {
				return
			}
		}
	}, 500, tally)
	close(stop)
	if p := <-peak; p <= 1_000 {
		t.Errorf("negative control: a node with the default MaxActors held at most %d actors for 3,000 distinct reads, want over 1,000", p)
	} else {
		t.Logf("negative control: the default MaxActors held %d live actors", p)
	}
	open.Stop()

	// A retained allocation over the limit is seen by the heap check.
	before := floodHeap()
	ballast := make([]byte, 48*floodMiB)
	for i := range ballast {
		ballast[i] = 1
	}
	after := floodHeap()
	if !floodHeapGrew(before, after, 32*floodMiB) {
		t.Errorf("negative control: 48 MiB retained, heap %d → %d not seen over a 32 MiB bound", before, after)
	}
	runtime.KeepAlive(ballast)
}
