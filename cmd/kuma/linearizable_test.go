package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// The history a linearizability run records, one porcupine.Operation per
// request: Input is a linInput, Output a linOutput.
//
// How an outcome nobody knows is modelled. An append that timed out, found
// nobody answering or lost its connection may or may not have happened, and
// if it did, it may have happened long after the client gave up (a request
// buffered by the NATS client while it reconnects is sent afterwards). Such
// an operation gets the end of the history as its return time and the
// output linUnknown. Its step is still deterministic, because an append with
// an expected version is a compare-and-set: at any point the state decides
// whether it applies. The nondeterminism is only in where it took effect,
// and porcupine already searches every linearization point in [call,
// return]: a point where it applied, or after every other operation, which
// is the same as never having happened. So no power-set model is needed.
// A read with an unknown outcome tells nothing and is left out.

// linInput is what a client asked of one entity.
type linInput struct {
	Entity   string
	Read     bool
	Expected int64 // appends: the expected version sent
	N        int64 // appends: events in the batch
}

// linOutcome is what the client learned.
type linOutcome int

const (
	linOK       linOutcome = iota // append acknowledged; Version is its last_version
	linConflict                   // version_conflict; Version is its actual_version
	linRead                       // read answered; Version is the entity's (0: not_found)
	linUnknown                    // append with no answer: it may or may not have happened
)

type linOutput struct {
	Outcome linOutcome
	Version int64
}

// linModel is one entity's sequential specification: the state is its
// version.
func linModel() porcupine.Model {
	return porcupine.Model{
		Partition: linPartition,
		Init:      func() any { return int64(0) },
		Step:      linStep,
		Hash:      func(s any) uint64 { return uint64(s.(int64)) },
		DescribeOperation: func(input, output any) string {
			in, out := input.(linInput), output.(linOutput)
			if in.Read {
				return fmt.Sprintf("read → %d", out.Version)
			}
			switch out.Outcome {
			case linOK:
				return fmt.Sprintf("append(expect %d, +%d) → ok %d", in.Expected, in.N, out.Version)
			case linConflict:
				return fmt.Sprintf("append(expect %d, +%d) → conflict at %d", in.Expected, in.N, out.Version)
			}
			return fmt.Sprintf("append(expect %d, +%d) → unknown", in.Expected, in.N)
		},
		DescribeState: func(s any) string { return fmt.Sprintf("version %d", s.(int64)) },
	}
}

func linStep(state, input, output any) (bool, any) {
	v := state.(int64)
	in, out := input.(linInput), output.(linOutput)
	if in.Read {
		return out.Outcome == linRead && out.Version == v, v
	}
	switch out.Outcome {
	case linOK:
		// The reply names the version the batch ended at, which must be
		// exactly the expected one plus the batch.
		return v == in.Expected && out.Version == in.Expected+in.N, in.Expected + in.N
	case linConflict:
		// The actual version is the entity's at the linearization point,
		// not merely some other version.
		return v != in.Expected && out.Version == v, v
	case linUnknown:
		if v == in.Expected {
			return true, v + in.N
		}
		return true, v
	}
	return false, v
}

// linPartition splits the history by entity: entities are independent, and
// a history is linearizable if and only if each entity's is.
func linPartition(h []porcupine.Operation) [][]porcupine.Operation {
	idx := map[string]int{}
	var out [][]porcupine.Operation
	for _, op := range h {
		e := op.Input.(linInput).Entity
		i, ok := idx[e]
		if !ok {
			i = len(out)
			idx[e] = i
			out = append(out, nil)
		}
		out[i] = append(out[i], op)
	}
	return out
}

// linAck is an acknowledged append, checked against the stored history at
// the end: its events must sit at the versions its reply named.
type linAck struct {
	entity      string
	key         string
	first, last int64
}

// linRecorder collects the history from every client.
type linRecorder struct {
	t0       time.Time
	inflight atomic.Int64

	mu          sync.Mutex
	ops         []porcupine.Operation
	unknownIdx  []int // ops whose return time is set at the end
	acks        []linAck
	outcomes    map[string]int
	unexpected  []string
	unknownRead int
}

func (r *linRecorder) now() int64 { return int64(time.Since(r.t0)) }

func (r *linRecorder) add(op porcupine.Operation, label string, ack *linAck) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if op.Output.(linOutput).Outcome == linUnknown {
		r.unknownIdx = append(r.unknownIdx, len(r.ops))
	}
	r.ops = append(r.ops, op)
	r.outcomes[label]++
	if ack != nil {
		r.acks = append(r.acks, *ack)
	}
}

func (r *linRecorder) note(label string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.outcomes[label]++
}

// linUnclear reports whether err leaves the request's outcome open: no
// answer in time, nobody answering, or the connection lost. Any other error
// is a definite answer the test does not expect.
func linUnclear(err error) bool {
	switch kuma.ErrorCode(err) {
	case kuma.CodeTimeout, kuma.CodeUnavailable:
		return true
	}
	return errors.Is(err, context.DeadlineExceeded)
}

// linClient is one of the run's clients, with its own connection that
// reconnects forever across the server's crashes.
func linClient(t *testing.T, url string, id int, seed uint64, entities []string, rec *linRecorder, stop <-chan struct{}) {
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond),
		nats.Name("lin-client-"+strconv.Itoa(id)))
	if err != nil {
		t.Errorf("client %d: connect: %v", id, err)
		return
	}
	defer nc.Close()
	c, err := client.New(nc, client.Options{MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Errorf("client %d: %v", id, err)
		return
	}
	rng := rand.New(rand.NewPCG(seed, uint64(id)))
	known := map[string]int64{} // the version this client last saw, per entity
	for seq := 0; ; seq++ {
		select {
		case <-stop:
			return
		default:
		}
		entity := entities[rng.IntN(len(entities))]
		if rng.IntN(2) == 0 {
			linDoRead(t.Context(), c, id, entity, rec, known)
			continue
		}
		key := fmt.Sprintf("lin-%d-%d", id, seq)
		linDoAppend(t.Context(), c, id, entity, key, 1+int64(rng.IntN(3)), rec, known)
	}
}

// linOpTimeout bounds one request, retries included. A request cut off by
// a crash waits this long before it is recorded as unknown.
const linOpTimeout = 2 * time.Second

func linDoRead(ctx context.Context, c *client.Client, id int, entity string, rec *linRecorder, known map[string]int64) {
	ctx, cancel := context.WithTimeout(ctx, linOpTimeout)
	defer cancel()
	rec.inflight.Add(1)
	call := rec.now()
	r, err := c.Read(ctx, entity)
	ret := rec.now()
	rec.inflight.Add(-1)
	var version int64
	switch {
	case err == nil:
		version = r.Version
	case errors.Is(err, kuma.ErrNotFound):
	case linUnclear(err):
		rec.mu.Lock()
		rec.unknownRead++
		rec.mu.Unlock()
		rec.note("read unknown")
		return
	default:
		rec.mu.Lock()
		rec.unexpected = append(rec.unexpected, fmt.Sprintf("read %s: %v", entity, err))
		rec.mu.Unlock()
		return
	}
	known[entity] = version
	rec.add(porcupine.Operation{ClientId: id, Input: linInput{Entity: entity, Read: true},
		Call: call, Output: linOutput{Outcome: linRead, Version: version}, Return: ret}, "read", nil)
}

func linDoAppend(ctx context.Context, c *client.Client, id int, entity, key string, n int64, rec *linRecorder, known map[string]int64) {
	ctx, cancel := context.WithTimeout(ctx, linOpTimeout)
	defer cancel()
	expected := known[entity]
	events := make([]kuma.EventInput, n)
	for i := range events {
		events[i] = kuma.EventInput{Type: "LinTick", Data: json.RawMessage(fmt.Sprintf(`{"key":%q,"i":%d}`, key, i))}
	}
	in := linInput{Entity: entity, Expected: expected, N: n}
	rec.inflight.Add(1)
	call := rec.now()
	r, err := c.Append(ctx, entity, events, client.ExpectVersion(expected), client.IdempotencyKey(key))
	ret := rec.now()
	rec.inflight.Add(-1)
	var kerr *kuma.Error
	switch {
	case err == nil:
		known[entity] = r.LastVersion
		rec.add(porcupine.Operation{ClientId: id, Input: in, Call: call,
			Output: linOutput{Outcome: linOK, Version: r.LastVersion}, Return: ret},
			"append ok", &linAck{entity: entity, key: key, first: r.FirstVersion, last: r.LastVersion})
	case errors.As(err, &kerr) && kerr.Code == kuma.CodeVersionConflict:
		actual, ok := kerr.ActualVersion()
		if !ok {
			rec.mu.Lock()
			rec.unexpected = append(rec.unexpected, fmt.Sprintf("append %s: conflict without actual_version: %v", entity, err))
			rec.mu.Unlock()
			return
		}
		known[entity] = actual
		rec.add(porcupine.Operation{ClientId: id, Input: in, Call: call,
			Output: linOutput{Outcome: linConflict, Version: actual}, Return: ret}, "append conflict", nil)
	case linUnclear(err):
		// The return time is set to the end of the history once known.
		rec.add(porcupine.Operation{ClientId: id, Input: in, Call: call,
			Output: linOutput{Outcome: linUnknown}}, "append unknown", nil)
	default:
		rec.mu.Lock()
		rec.unexpected = append(rec.unexpected, fmt.Sprintf("append %s: %v", entity, err))
		rec.mu.Unlock()
	}
}

// TestLinearizableAcrossCrashes runs twenty clients over eight entities
// against a real `kuma up`, reading and appending with expected versions
// (so that conflicts happen), SIGKILLs the process at random moments and
// starts it again on the same data dir and port, and asks porcupine whether
// the recorded history of every entity is linearizable. A copy of the
// history with one read made stale must be found Illegal.
func TestLinearizableAcrossCrashes(t *testing.T) {
	for run := range linRuns {
		t.Run("run"+strconv.Itoa(run), func(t *testing.T) { linRun(t) })
	}
}

func linRun(t *testing.T) {
	const clients, nEntities = 20, 8
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 0))
	t.Logf("seed %d", seed)

	dir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	url := "nats://127.0.0.1:" + strconv.Itoa(port)
	cmd, logs := startUp(t, dir, port)

	entities := make([]string, nEntities)
	for i := range entities {
		entities[i] = fmt.Sprintf("lin-%d-%d", seed%100000, i)
	}
	rec := &linRecorder{t0: time.Now(), outcomes: map[string]int{}}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() { linClient(t, url, i, seed, entities, rec, stop) })
	}
	// halt stops the clients; deferred too, so that a failed restart does
	// not leave them logging after the test has ended.
	var stopOnce sync.Once
	halt := func() {
		stopOnce.Do(func() { close(stop) })
		wg.Wait()
	}
	defer halt()

	var downtime time.Duration
	for k := range linKills {
		time.Sleep(linPhase/2 + time.Duration(rng.Int64N(int64(linPhase/2))))
		inflight := rec.inflight.Load()
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("kill %d: kuma up ended with %v, not SIGKILL\n%s", k, cmd.ProcessState, logs)
		}
		down := time.Now()
		cmd, logs = startUp(t, dir, port)
		downtime += time.Since(down)
		t.Logf("kill %d: %d requests in flight; ready again in %v", k+1, inflight, time.Since(down).Round(time.Millisecond))
	}
	time.Sleep(linPhase)
	halt()

	// A last read of every entity, once nothing else runs, pins down the
	// final versions: an unknown append that did happen must be placed
	// before it.
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c, err := client.New(nc, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	final := map[string]int64{}
	for _, e := range entities {
		linDoRead(t.Context(), c, clients, e, rec, final)
	}
	end := rec.now() + 1
	for _, i := range rec.unknownIdx {
		rec.ops[i].Return = end
	}
	if len(rec.unexpected) > 0 {
		t.Errorf("%d answers with codes the test does not expect, first: %v", len(rec.unexpected), rec.unexpected[:min(5, len(rec.unexpected))])
	}

	model := linModel()
	start := time.Now()
	res, info := porcupine.CheckOperationsVerbose(model, rec.ops, linCheckLimit)
	took := time.Since(start)
	t.Logf("operations %d (%v), unknown reads left out %d, entities %d, kills %d, downtime %v, result %s, checked in %v",
		len(rec.ops), rec.outcomes, rec.unknownRead, nEntities, linKills, downtime.Round(time.Millisecond), res, took.Round(time.Millisecond))
	t.Logf("final versions %v", final)
	if res != porcupine.Ok {
		linVisualize(t, model, info)
		t.Fatalf("the history is %s, want Ok", res)
	}
	if rec.outcomes["append ok"] == 0 || rec.outcomes["append conflict"] == 0 || rec.outcomes["read"] == 0 {
		t.Fatalf("the run did not exercise every outcome: %v", rec.outcomes)
	}

	linCheckAcks(t, c, rec.acks)
	linNegativeControl(t, model, rec.ops)
}

// linVisualize writes porcupine's picture of a failed check to a file that
// outlives the test, and logs where.
func linVisualize(t *testing.T, model porcupine.Model, info porcupine.LinearizationInfo) {
	f, err := os.CreateTemp("", "kuma-linearizability-*.html")
	if err != nil {
		t.Logf("visualization: %v", err)
		return
	}
	f.Close()
	if err := porcupine.VisualizePath(model, info, f.Name()); err != nil {
		t.Logf("visualization: %v", err)
		return
	}
	t.Logf("visualization in %s", f.Name())
}

// linCheckAcks reads each entity's stored history and checks that every
// acknowledged append's events sit at the versions its reply named. The
// version checks above cannot tell two batches of the same size apart.
func linCheckAcks(t *testing.T, c *client.Client, acks []linAck) {
	t.Helper()
	stored := map[string]map[int64]string{} // entity → version → key
	for _, a := range acks {
		if stored[a.entity] != nil {
			continue
		}
		m := map[int64]string{}
		for from := int64(1); ; {
			h, err := c.History(t.Context(), a.entity, from, kuma.MaxHistoryLimit)
			if err != nil {
				t.Fatalf("history of %s: %v", a.entity, err)
			}
			for _, e := range h.Events {
				var d struct {
					Key string `json:"key"`
				}
				if err := json.Unmarshal(e.Data, &d); err != nil {
					t.Fatalf("%s v%d: %v", a.entity, e.Version, err)
				}
				m[e.Version] = d.Key
			}
			if h.NextVersion == nil {
				break
			}
			from = *h.NextVersion
		}
		stored[a.entity] = m
	}
	for _, a := range acks {
		for v := a.first; v <= a.last; v++ {
			if got := stored[a.entity][v]; got != a.key {
				t.Fatalf("%s version %d holds the events of %q, but %q was acknowledged there", a.entity, v, got, a.key)
			}
		}
	}
	t.Logf("acknowledged appends %d, all at the versions they were acknowledged at", len(acks))
}

// linNegativeControl makes one read in a copy of the history stale: it
// answers the version an append had expected although that append was
// acknowledged before the read began. porcupine must call that Illegal.
func linNegativeControl(t *testing.T, model porcupine.Model, ops []porcupine.Operation) {
	t.Helper()
	bad := slices.Clone(ops)
	var candidates []int
	for i, op := range bad {
		in := op.Input.(linInput)
		if !in.Read {
			continue
		}
		for _, w := range bad {
			if w.Input.(linInput).Entity == in.Entity && !w.Input.(linInput).Read &&
				w.Output.(linOutput).Outcome == linOK && w.Return < op.Call {
				candidates = append(candidates, i)
				break
			}
		}
	}
	if len(candidates) == 0 {
		t.Fatal("negative control: no read follows an acknowledged append")
	}
	i := candidates[len(candidates)/2]
	r := bad[i]
	var stale int64 = -1
	var latest int64 = -1
	for _, w := range bad {
		if w.Input.(linInput).Entity == r.Input.(linInput).Entity && !w.Input.(linInput).Read &&
			w.Output.(linOutput).Outcome == linOK && w.Return < r.Call && w.Return > latest {
			latest, stale = w.Return, w.Input.(linInput).Expected
		}
	}
	bad[i].Output = linOutput{Outcome: linRead, Version: stale}
	res := porcupine.CheckOperationsTimeout(model, bad, linCheckLimit)
	t.Logf("negative control: read of %s at %v answering %d instead of %d: %s",
		r.Input.(linInput).Entity, time.Duration(r.Call), stale, r.Output.(linOutput).Version, res)
	if res != porcupine.Illegal {
		t.Fatalf("negative control: a stale read was judged %s, want Illegal", res)
	}
}
