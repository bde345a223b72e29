//go:build cluster

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestKillEachNodeInTurn: no node of three is special. Under a write load,
// kill -9 of n1 (which formed the cluster), then n2, then n3, each started
// again and settled before the next: every time a new entity (a new key,
// from a keyvault on a survivor) is accepted, the entities projection
// answers it with read-your-writes (a projector replica on a survivor), and
// a forget goes through, within the failover; every entity forgotten so
// far reads entity_forgotten through every node. At the end nothing
// acknowledged is lost and the stream never had two writers of one entity.
func TestKillEachNodeInTurn(t *testing.T) {
	// Every server's URL: the connection moves to a survivor when its
	// server is the one killed.
	c, nc := startKeyed(t)
	names := keyedNodes
	// 20 writers, as in TestQueriesSurviveProjectorLoss: three nodes of
	// R3 replicas on two shared cores keep their projector replicas
	// current at that rate, not under the 200 writers of the other tests
	// (each replica falls further behind the stream, and a query with
	// after then times out whatever the failover does).
	// Each projector replica's durable lives on its own node's server, so
	// that the death of another node leaves the replica's feed alone.
	durablesAtHome(t, nc, names)
	l := startLoad(t, nc, loadConfig{writers: 20, shards: clusterShards, attempt: 5 * time.Second})
	l.waitAcks(t, 1000, 60*time.Second)
	cl, err := client.New(nc, client.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// One entity to forget after each kill.
	for round := range names {
		e := fmt.Sprintf("gone-%d", round)
		if _, err := cl.Append(t.Context(), e, []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"secret":"s"}`)}}, client.IdempotencyKey(e)); err != nil {
			t.Fatalf("append %s: %v", e, err)
		}
	}

	for round, name := range names {
		victim := c.node(name)
		if err := victim.p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = victim.p.cmd.Wait()
		killed := time.Now()

		// A new entity, retried with its idempotency key until accepted,
		// then asked for with after until a replica has applied it.
		// Only failover answers are allowed meanwhile.
		e := fmt.Sprintf("turn-%d", round)
		var pos string
		var accepted, projected time.Duration
		failed := newFailures()
		for pos == "" || projected == 0 {
			if time.Since(killed) > 2*time.Minute {
				t.Fatalf("kill -9 of %s: new entity %s not accepted and projected within 2 minutes (accepted after %s); failures %v; projections %s",
					name, e, accepted, failed, projectorLags(cl))
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if pos == "" {
				r, err := cl.Append(ctx, e, []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"round":` + fmt.Sprint(round) + `}`)}}, client.IdempotencyKey(e))
				if err == nil {
					pos, accepted = r.Position, time.Since(killed)
				} else {
					retryable(t, name, "append", err, failed)
				}
			} else {
				wait := 5000
				q, err := cl.Query(ctx, "entities", &kuma.QueryRequest{After: pos, WaitMS: &wait,
					Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"` + e + `"`)}})
				switch {
				case err == nil && len(q.Rows) == 1:
					projected = time.Since(killed)
				case err == nil:
					t.Fatalf("kill -9 of %s: the entities projection answered %d rows for %s after its position %s; want 1", name, len(q.Rows), e, pos)
				default:
					retryable(t, name, "query", err, failed)
				}
			}
			cancel()
			if pos == "" || projected == 0 {
				time.Sleep(100 * time.Millisecond)
			}
		}
		// A forget through the survivors, retried like the append.
		gone := fmt.Sprintf("gone-%d", round)
		for {
			if time.Since(killed) > 3*time.Minute {
				t.Fatalf("kill -9 of %s: forget of %s not done within 3 minutes; failures %v", name, gone, failed)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err := cl.Forget(ctx, gone, "test", "dpo")
			cancel()
			if err == nil {
				break
			}
			retryable(t, name, "forget", err, failed)
			time.Sleep(100 * time.Millisecond)
		}
		forgotten := time.Since(killed)
		c.restart(name)
		settle(t, nc, names, 90*time.Second)
		back := time.Since(killed)
		// Forgotten through every node, the one just restarted included.
		for _, n := range names {
			only, err := client.New(connect(t, "nats://127.0.0.1:"+strconv.Itoa(c.node(n).natsPort)), client.Options{Timeout: 10 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			for r := 0; r <= round; r++ {
				e := fmt.Sprintf("gone-%d", r)
				if _, err := only.Read(t.Context(), e); !errors.Is(err, kuma.ErrEntityForgotten) {
					t.Errorf("after the kill of %s: read of forgotten %s through %s: %v, want entity_forgotten", name, e, n, err)
				}
			}
		}
		// The load goes on through each failover: it must move again.
		l.waitAcks(t, 500, 60*time.Second)
		t.Logf("kill -9 of %s: new entity accepted %s and projected %s after the kill, an entity forgotten %s after it, failed attempts (retried) %v; restarted and settled %s after it",
			name, accepted.Round(time.Millisecond), projected.Round(time.Millisecond), forgotten.Round(time.Millisecond), failed.n, back.Round(time.Millisecond))
	}
	// Restarted, each replica made its durable at home again.
	durablesAtHome(t, nc, names)
	l.finish()
	t.Logf("under 20 writers: %d appends acknowledged, append p99 %s, failed attempts (retried) %d %v",
		l.acks.Load(), l.p99().Round(time.Millisecond), l.failures.Load(), l.errs)
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	for round := range names {
		if _, err := cl.Read(t.Context(), fmt.Sprintf("turn-%d", round)); err != nil {
			t.Errorf("read of turn-%d at the end: %v", round, err)
		}
	}
	t.Logf("no acknowledged event lost: verified %d events of %d entities", n, len(l.acked))
}

// failures counts the failed attempts of a failover by code, and keeps the
// last error of each code to say why in a failure message.
type failures struct {
	n    map[kuma.Code]int
	last map[kuma.Code]string
}

func newFailures() *failures {
	return &failures{n: map[kuma.Code]int{}, last: map[kuma.Code]string{}}
}

func (f *failures) String() string {
	s := fmt.Sprint(f.n)
	for _, c := range slices.Sorted(maps.Keys(f.last)) {
		s += fmt.Sprintf("; last %s: %s", c, f.last[c])
	}
	return s
}

// retryable counts a failed attempt during a failover and fails the test
// on any answer other than the two a failover may give (unavailable, or a
// timeout of a request its server took down with it).
func retryable(t *testing.T, victim, what string, err error, failed *failures) {
	t.Helper()
	c := kuma.ErrorCode(err)
	failed.n[c]++
	failed.last[c] = what + ": " + err.Error()
	if !errors.Is(err, kuma.ErrUnavailable) && !errors.Is(err, kuma.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("kill -9 of %s: %s answered %v; a failover may only answer unavailable or timeout", victim, what, err)
	}
}

// projectorLags says, for a failure message, how far behind the stream each
// projector replica of each projection is.
func projectorLags(cl *client.Client) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := cl.Status(ctx)
	if err != nil {
		return "(status: " + err.Error() + ")"
	}
	var out []string
	for _, p := range st.Projections {
		for _, r := range p.Replicas {
			out = append(out, fmt.Sprintf("%s on %s: %s, lag %d", p.Name, r.Node, r.State, r.Lag))
		}
	}
	return strings.Join(out, "; ")
}

// durablesAtHome waits until every node in nodes has a projector durable on
// the stream and every projector durable lives on the server of the node it
// feeds (services/projector/consumer.go places them so).
func durablesAtHome(t *testing.T, nc *nats.Conn, nodes []string) {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	var away []string
	for deadline := time.Now().Add(30 * time.Second); ; {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		st, err := js.Stream(ctx, kuma.StreamName(kuma.DefaultContext))
		away = away[:0]
		fed := map[string]bool{}
		if err == nil {
			list := st.ListConsumers(ctx)
			for info := range list.Info() {
				node := info.Config.Metadata[kuma.ConsumerMetaNode]
				if node == "" {
					continue
				}
				fed[node] = true
				if info.Cluster == nil || info.Cluster.Leader != node {
					at := "?"
					if info.Cluster != nil {
						at = info.Cluster.Leader
					}
					away = append(away, info.Name+" of "+node+" on "+at)
				}
			}
			err = list.Err()
		}
		cancel()
		for _, n := range nodes {
			if !fed[n] {
				away = append(away, "no durable of "+n)
			}
		}
		if err == nil && len(away) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("projector durables not on their own node's server after 30s: %v (%v)", away, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
