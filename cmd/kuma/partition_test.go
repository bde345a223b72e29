//go:build cluster

// A network partition (issue 18): one node of three is cut off from the
// other two while its own clients stay connected to it. Unlike a kill or a
// SIGSTOP, the cut node keeps running and keeps answering its clients, so
// this is where a fencing bug (an append acknowledged by both sides) would
// show.
//
// The cut needs no root: every NATS route between the nodes goes through
// a TCP proxy run by the test, one per ordered pair of nodes, and the test
// closes the proxies' connections to cut. Two things keep the routes on
// the proxies: each node joins the others by their proxies (--join), and
// each advertises (--cluster-advertise) an address where the test accepts
// and drops every connection, so a node that learns of another by gossip
// cannot dial it directly. The test checks the cut is real by asking every
// server a node reaches (the account STATZ ping that travels the routes).

package main

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go"
)

// leaseTTL is the shardnode's default lease: the longest a node cut off
// from the lease bucket may go on writing a shard.
const leaseTTL = 6 * time.Second

// TestPartitionCutsOneNodeOff: three replicated nodes, writers on both
// sides of the coming cut (clients of n3, and clients of n1 and n2) append
// to the same entities. n3 is cut off from n1 and n2 while its clients stay
// connected to it. It must stop acknowledging within its lease, the
// majority must take its shards and acknowledge writes on them, no entity
// version may be acknowledged twice, and once the cut heals n3 serves
// shards again and every acknowledged event is there with its payload.
func TestPartitionCutsOneNodeOff(t *testing.T) {
	rn := newRouteNet(t)
	c := newCluster(t, "replicated")
	c.routeVia = rn.route
	c.extraArgs = []string{"--cluster-advertise", rn.advertise}
	names := []string{"n1", "n2", "n3"}
	c.add(names...)
	// No client may wander to a server of the other side: each keeps the
	// servers it was given.
	nc12 := connect(t, c.urls("n3"), nats.IgnoreDiscoveredServers())
	nc3 := connect(t, c.urls("n1", "n2"), nats.IgnoreDiscoveredServers())
	before := settle(t, nc12, names, 60*time.Second)
	if n := peersSeen(nc3, 3, 10*time.Second); n != 3 {
		t.Fatalf("n3 reaches %d servers through the proxies before the cut, want 3", n)
	}
	var cutShards []int
	for shard, le := range before {
		if le.Owner == "n3" {
			cutShards = append(cutShards, shard)
		}
	}
	sort.Ints(cutShards)
	if len(cutShards) == 0 {
		t.Fatal("n3 owns no shard before the cut")
	}
	majority, err := client.New(nc12, client.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	minority, err := client.New(nc3, client.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	entities := splitEntities(3)
	l := startSplitLoad(entities, map[string]*client.Client{"majority": majority, "minority": minority})
	defer l.finish()
	for start := time.Now(); l.count("minority", start) < 300 || l.count("majority", start) < 300; time.Sleep(50 * time.Millisecond) {
		if time.Since(start) > 60*time.Second {
			t.Fatalf("load stalled before the cut: minority %d, majority %d acknowledged", l.count("minority", start), l.count("majority", start))
		}
	}

	cut := time.Now()
	l.phase.Store("cut")
	rn.cutOff("n3", true)
	// The cut is real: n3's server reaches no other server, and n1's and
	// n2's reach each other but not n3.
	if n := peersSeen(nc3, 1, 15*time.Second); n != 1 {
		t.Fatalf("after the cut n3 still reaches %d servers, want 1 (a route outside the proxies?)", n)
	}
	if n := peersSeen(nc12, 2, 15*time.Second); n != 2 {
		t.Fatalf("after the cut n1 reaches %d servers, want 2", n)
	}
	isolated := time.Since(cut)

	// The majority takes n3's shards: every one has a new owner at a newer
	// epoch, and a majority writer's append on it is acknowledged.
	onCut := map[string]int{}
	for _, e := range entities {
		if s := placement.ShardOf(e, clusterShards); contains(intsToStrings(cutShards), strconv.Itoa(s)) {
			onCut[e] = s
		}
	}
	var served time.Duration
	for {
		first := map[int]time.Time{}
		for _, a := range l.acked() {
			if s, ok := onCut[a.entity]; ok && a.side == "majority" && a.at.After(cut) && (first[s].IsZero() || a.at.Before(first[s])) {
				first[s] = a.at
			}
		}
		if len(first) == len(cutShards) {
			for _, at := range first {
				served = max(served, at.Sub(cut))
			}
			break
		}
		if time.Since(cut) > 60*time.Second {
			t.Fatalf("60 s after the cut the majority had acknowledged appends on %d of n3's %d shards %v", len(first), len(cutShards), cutShards)
		}
		time.Sleep(100 * time.Millisecond)
	}
	m := leases(t, nc12)
	for _, s := range cutShards {
		if m[s].Owner == "n3" || m[s].Epoch <= before[s].Epoch {
			t.Errorf("shard %d: lease %+v after the majority served it, want a new owner at an epoch above %d", s, m[s], before[s].Epoch)
		}
	}
	// Hold the cut past n3's lease and a few seconds more, so that an
	// acknowledgement it should not give has the time to show.
	if wait := 2*leaseTTL - time.Since(cut); wait > 0 {
		time.Sleep(wait)
	}
	// What n3 says of itself meanwhile (its lease bucket replica is cut
	// off too).
	stCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	st, stErr := minority.Status(stCtx)
	cancel()
	cutView := fmt.Sprint(stErr)
	if stErr == nil {
		cutView = fmt.Sprintf("answered by %s, nodes %+v", st.AnsweredBy, st.Nodes)
	}
	taken := leases(t, nc12)
	minorityAcks := l.count("minority", cut)

	heal := time.Now()
	l.phase.Store("healed")
	rn.cutOff("n3", false)
	if n := peersSeen(nc3, 3, 30*time.Second); n != 3 {
		t.Fatalf("30 s after the heal n3 reaches %d servers, want 3", n)
	}
	reconnected := time.Since(heal)
	// n3 serves again: it takes a shard back at a newer epoch (the leases
	// as the bucket's leader has them: n3's own replica may still show its
	// old leases).
	var rejoined time.Duration
	for {
		m := leases(t, nc12)
		back := false
		for shard, le := range m {
			back = back || (le.Owner == "n3" && le.Epoch > taken[shard].Epoch)
		}
		if back {
			rejoined = time.Since(heal)
			break
		}
		if time.Since(heal) > 90*time.Second {
			t.Fatalf("90 s after the heal n3 holds no shard: %v", m)
		}
		time.Sleep(100 * time.Millisecond)
	}
	settle(t, nc12, names, 90*time.Second)
	settled := time.Since(heal)
	for start := time.Now(); l.count("minority", heal) < 300; time.Sleep(50 * time.Millisecond) {
		if time.Since(start) > 60*time.Second {
			t.Fatalf("n3's clients got %d appends acknowledged in the 60 s after the shards settled", l.count("minority", heal))
		}
	}
	l.finish()
	ended := time.Now()
	// The cluster's status, asked through n3, shows n3 holding shards.
	stCtx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	st, err = minority.Status(stCtx)
	cancel()
	if err != nil {
		t.Fatalf("status through n3 after the heal: %v", err)
	}
	if i := slices.IndexFunc(st.Nodes, func(n kuma.NodeStatus) bool { return n.Name == "n3" }); i < 0 || st.Nodes[i].Shards == 0 {
		t.Errorf("status through n3 after the heal: nodes %+v, want n3 holding shards", st.Nodes)
	}

	// What n3's clients got while cut off.
	acks := l.acked()
	var lastMinority time.Duration
	var late []string
	for _, a := range acks {
		if a.side == "minority" && a.at.After(cut) && a.at.Before(heal) {
			lastMinority = max(lastMinority, a.at.Sub(cut))
			if a.at.Sub(cut) > leaseTTL && len(late) < 5 {
				late = append(late, fmt.Sprintf("%s append %d at version %d, %s after the cut", a.entity, a.i, a.version, a.at.Sub(cut).Round(time.Millisecond)))
			}
		}
	}
	cutCodes := l.errCodes("minority", "cut")
	t.Logf("cut n3 off (it held %d of %d shards %v) at %s; isolated (STATZ: n3 reaches 1 server, n1 2) %s after",
		len(cutShards), clusterShards, cutShards, cut.Format("15:04:05.000"), isolated.Round(time.Millisecond))
	t.Logf("n3's clients: %d appends acknowledged during the cut, the last %s after it (lease %s); their errors while cut off: %v; n3's status while cut off: %s",
		minorityAcks, lastMinority.Round(time.Millisecond), leaseTTL, cutCodes, cutView)
	t.Logf("majority: acknowledged appends on all of n3's shards %s after the cut; its errors while n3 was cut off: %v",
		served.Round(time.Millisecond), l.errCodes("majority", "cut"))
	t.Logf("heal: routes back %s after it, n3 took a shard back after %s, shards settled on all three after %s; longest time without an acknowledgement after the heal: majority %s, minority %s; errors after the heal: minority %v, majority %v",
		reconnected.Round(time.Millisecond), rejoined.Round(time.Millisecond), settled.Round(time.Millisecond),
		longestGap(acks, "majority", heal, ended).Round(time.Millisecond), longestGap(acks, "minority", heal, ended).Round(time.Millisecond),
		l.errCodes("minority", "healed"), l.errCodes("majority", "healed"))
	t.Logf("first errors of each side and phase:\n%s", strings.Join(l.notes, "\n"))
	if len(late) > 0 {
		t.Errorf("n3 acknowledged appends more than its lease (%s) after it was cut off:\n%s", leaseTTL, strings.Join(late, "\n"))
	}
	for code := range cutCodes {
		if code != string(kuma.CodeUnavailable) && code != string(kuma.CodeTimeout) {
			t.Errorf("n3's clients got %q while it was cut off, want only %q or %q: %v\n%s", code, kuma.CodeUnavailable, kuma.CodeTimeout, cutCodes, strings.Join(l.notes, "\n"))
			break
		}
	}
	checkSplitAcks(t, acks)
	total := checkSplitHistories(t, acks, entities, minority, c)
	streamHasOneWriter(t, nc12, total)
	t.Logf("%d appends acknowledged (%d by n3's clients during the cut); every one read back through n3 with its payload, one writer per entity version: %d events of %d entities",
		len(acks), minorityAcks, total, len(entities))
}

// relayFailures is the last "relay publish failed" line of each node's log
// for each shard subject, with how many there were: a relay that cannot
// publish holds its shard's replicated appends (and the reads queued
// behind them).
func relayFailures(c *testCluster) string {
	var out []string
	for _, n := range c.nodes {
		last := map[string]string{}
		count := map[string]int{}
		for _, line := range strings.Split(n.p.logs.String(), "\n") {
			if !strings.Contains(line, "relay publish failed") {
				continue
			}
			_, subj, _ := strings.Cut(line, "subject=")
			subj, _, _ = strings.Cut(subj, " ")
			last[subj] = line
			count[subj]++
		}
		for subj, line := range last {
			out = append(out, fmt.Sprintf("%s: %d failures of %s, the last: %s", n.name, count[subj], subj, line))
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// longestGap is the longest time in [from, to] without an acknowledgement
// of side.
func longestGap(acks []sideAck, side string, from, to time.Time) time.Duration {
	var at []time.Time
	for _, a := range acks {
		if a.side == side && a.at.After(from) && a.at.Before(to) {
			at = append(at, a.at)
		}
	}
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	gap, prev := time.Duration(0), from
	for _, t := range append(at, to) {
		gap = max(gap, t.Sub(prev))
		prev = t
	}
	return gap
}
