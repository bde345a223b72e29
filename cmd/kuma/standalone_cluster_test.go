//go:build cluster

package main

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestStandaloneKilledThenClustered: a standalone `kuma up` under a
// writer load is killed with -9 (its relays may not have published what
// they committed last), started again on the same data dir as the first
// member of a cluster, and joined by a second and then a third node, the
// load going on through the first node's NATS port all along. Every
// acknowledged event is there once with contiguous versions, the stream
// has one writer per shard, and the shards settle on all three nodes.
func TestStandaloneKilledThenClustered(t *testing.T) {
	c := newCluster(t, "local")
	n1 := &clusterNode{name: "n1", natsPort: freePort(t), metricsPort: freePort(t)}
	standalone := []string{"up", "--node", "n1", "--data", c.dir + "/n1", "--shards", strconv.Itoa(clusterShards),
		"--nats-listen", "127.0.0.1:" + strconv.Itoa(n1.natsPort),
		"--metrics-listen", "127.0.0.1:" + strconv.Itoa(n1.metricsPort),
		"--console-listen", "", "--log-format", "text"}
	n1.p = spawn(t, standalone, "KUMA_MASTER_KEY=")
	c.nodes = append(c.nodes, n1)
	n1.p.waitReady(t, 60*time.Second)

	nc := connect(t, "nats://127.0.0.1:"+strconv.Itoa(n1.natsPort))
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards, attempt: 3 * time.Second})
	l.waitAcks(t, 2000, 60*time.Second)
	if err := n1.p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = n1.p.cmd.Wait()
	killedAt := l.acks.Load()

	// The same node, now the first member of a cluster; it serves once a
	// second member has joined and its streams are restored.
	n1.routePort = freePort(t)
	n1.args = append(standalone, "--cluster-listen", "127.0.0.1:"+strconv.Itoa(n1.routePort))
	n1.p = spawn(t, n1.args, "KUMA_MASTER_KEY=")
	restarted := n1.p
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the converting node n1's log:\n%s", tail(restarted.logs.String(), 80))
		}
	})
	start := time.Now()
	c.add("n2")
	n1.p.waitReady(t, 90*time.Second)
	converted := time.Since(start)
	for _, line := range []string{"exported the standalone JetStream store", "carried the standalone node's streams into the cluster"} {
		if !strings.Contains(n1.p.logs.String(), line) {
			t.Fatalf("n1's log lacks %q:\n%s", line, tail(n1.p.logs.String(), 60))
		}
	}
	l.waitAcks(t, 2000, 120*time.Second)
	c.add("n3")
	settle(t, nc, []string{"n1", "n2", "n3"}, 120*time.Second)
	l.waitAcks(t, 2000, 60*time.Second)
	l.finish()
	t.Logf("standalone killed after %d acknowledged appends; clustered and serving %s after its restart; %d appends acknowledged in all, failed attempts (retried) %d %v",
		killedAt, converted.Round(time.Millisecond), l.acks.Load(), l.failures.Load(), l.errs)
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	t.Logf("no acknowledged event lost: verified %d events of %d entities", n, len(l.acked))
}
