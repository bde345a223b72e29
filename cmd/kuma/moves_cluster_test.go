//go:build cluster

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
)

// TestJoinTwoNodesUnderLoad: three nodes serve 16 shards under a steady
// 200-writer load; two more join. About 2/5 of the shards move to them,
// the moves finish, no client request fails, and every acknowledged event
// is there once with contiguous versions.
func TestJoinTwoNodesUnderLoad(t *testing.T) {
	c := newCluster(t, "local")
	c.add("n1", "n2", "n3")
	nc := connect(t, c.urls())
	before := settle(t, nc, []string{"n1", "n2", "n3"}, 60*time.Second)
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards})
	l.waitAcks(t, 2000, 60*time.Second)
	start := time.Now()
	c.add("n4", "n5")
	after := settle(t, nc, []string{"n1", "n2", "n3", "n4", "n5"}, 120*time.Second)
	took := time.Since(start)
	moved := 0
	for shard, l := range after {
		if before[shard].Owner != l.Owner {
			moved++
		}
	}
	l.waitAcks(t, 2000, 60*time.Second)
	l.finish()
	t.Logf("join: %d of %d shards moved (rendezvous expects about 2/5, %.1f) in %s; %d appends acknowledged, append p99 %s, failed requests %d %v",
		moved, clusterShards, float64(clusterShards)*2/5, took.Round(time.Millisecond), l.acks.Load(), l.p99().Round(time.Millisecond), l.failures.Load(), l.errs)
	if moved == 0 {
		t.Fatal("no shard moved to the new nodes")
	}
	if f := l.failures.Load(); f != 0 {
		t.Errorf("%d client requests failed during the join: %v\n%s", f, l.errs, strings.Join(l.samples, "\n"))
	}
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	t.Logf("verified %d events of %d entities", n, len(l.acked))
}

// TestMigrateBusyShard20Times: `kuma migrate` moves a shard that 200
// writers keep busy back and forth between two nodes 20 times: zero failed
// requests, zero lost or duplicated events.
func TestMigrateBusyShard20Times(t *testing.T) {
	c := newCluster(t, "local")
	c.add("n1", "n2")
	nc := connect(t, c.urls())
	settle(t, nc, []string{"n1", "n2"}, 60*time.Second)
	// The busiest shard is the one holding the most writers' entities.
	count := map[int]int{}
	for w := range writers {
		count[placement.ShardOf(fmt.Sprintf("w-%03d", w), clusterShards)]++
	}
	shard := 0
	for s, n := range count {
		if n > count[shard] {
			shard = s
		}
	}
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards})
	l.waitAcks(t, 1000, 60*time.Second)
	env := map[string]string{"KUMA_NATS_URL": c.urls()}
	var took []time.Duration
	for i := range 20 {
		to := []string{"n1", "n2"}[i%2]
		if leases(t, nc)[shard].Owner == to {
			to = []string{"n2", "n1"}[i%2]
		}
		start := time.Now()
		out, errs, code := runCLI(t, env, "migrate", "--shard", strconv.Itoa(shard), "--to", to, "--wait", "60s")
		if code != 0 {
			t.Fatalf("migrate #%d of shard %d to %s: exit %d\n%s%s", i+1, shard, to, code, out, errs)
		}
		took = append(took, time.Since(start))
		t.Logf("%s migrate #%d of shard %d to %s: %s", time.Now().Format("15:04:05.000"), i+1, shard, to, strings.TrimSpace(errs))
		l.waitAcks(t, 200, 60*time.Second)
	}
	l.finish()
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	t.Logf("20 migrations of shard %d (%d writers' entities): each %s to %s (median %s); %d appends acknowledged, append p99 %s, failed requests %d %v",
		shard, count[shard], took[0].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond), took[len(took)/2].Round(time.Millisecond),
		l.acks.Load(), l.p99().Round(time.Millisecond), l.failures.Load(), l.errs)
	if f := l.failures.Load(); f != 0 {
		t.Errorf("%d client requests failed during the migrations: %v\n%s", f, l.errs, strings.Join(l.samples, "\n"))
	}
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
}

// TestKillOneOfThreeReplicated: in replicated mode, kill -9 one of three
// nodes under load. Its shards are served again by the survivors within a
// bounded time (printed), and no acknowledged event is lost.
func TestKillOneOfThreeReplicated(t *testing.T) {
	c := newCluster(t, "replicated")
	c.add("n1", "n2", "n3")
	nc := connect(t, c.urls("n3")) // the load does not go through the victim's server
	before := settle(t, nc, []string{"n1", "n2", "n3"}, 60*time.Second)
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards})
	l.waitAcks(t, 2000, 60*time.Second)
	victim := c.node("n3")
	var lost []int
	for shard, le := range before {
		if le.Owner == "n3" {
			lost = append(lost, shard)
		}
	}
	if err := victim.p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = victim.p.cmd.Wait()
	killed := time.Now()
	// Served again: each lost shard has a new owner at a higher epoch that
	// answers a read of an entity on it.
	probe := map[int]string{}
	for i := 0; len(probe) < len(lost); i++ {
		e := "probe-" + strconv.Itoa(i)
		if s := placement.ShardOf(e, clusterShards); contains(intsToStrings(lost), strconv.Itoa(s)) && probe[s] == "" {
			probe[s] = e
		}
	}
	for shard, entity := range probe {
		for {
			if time.Since(killed) > 120*time.Second {
				t.Fatalf("shard %d not served again within 2 minutes", shard)
			}
			le := leases(t, nc)[shard]
			if le.Owner != "n3" && le.Epoch > before[shard].Epoch {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := l.c.Append(ctx, entity, []kuma.EventInput{{Type: "Probe", Data: json.RawMessage(`{}`)}}, client.IdempotencyKey("probe-"+entity))
				cancel()
				if err == nil {
					break
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	failover := time.Since(killed)
	l.waitAcks(t, 2000, 120*time.Second)
	l.finish()
	t.Logf("kill -9 of n3 (%d of %d shards): all served again on the survivors %s after the kill; %d appends acknowledged, append p99 %s, failed attempts (retried) %d %v",
		len(lost), clusterShards, failover.Round(time.Millisecond), l.acks.Load(), l.p99().Round(time.Millisecond), l.failures.Load(), l.errs)
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	t.Logf("no acknowledged event lost: verified %d events of %d entities", n, len(l.acked))
}
