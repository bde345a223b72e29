//go:build cluster

package main

import (
	"io"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestPausedOwnerCannotWrite: SIGSTOP a shardnode past its lease; the
// others take its shards. When it wakes it must not write: its late
// commits are refused (kuma_shard_fenced_total), it gives the shards up
// (kuma_shard_moves_total{direction="lost"}), no acknowledged event is
// lost, and the stream never shows two writers of one entity.
//
// The paused process is a shardnode alone (kuma serve --target
// shardnode): a whole paused `kuma up` would also hold a NATS server and a
// router that the others keep routing requests to until NATS's two-minute
// ping gives up on them, which tests NATS, not Kuma's fencing.
func TestPausedOwnerCannotWrite(t *testing.T) {
	c := newCluster(t, "replicated")
	c.add("n1", "n2", "n3")
	c.addShardnode("s4")
	nc := connect(t, c.urls())
	members := []string{"n1", "n2", "n3", "s4"}
	before := settle(t, nc, members, 90*time.Second)
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards})
	l.waitAcks(t, 2000, 60*time.Second)
	victim := c.node("s4")
	if err := victim.p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	// Wait until every shard s4 held has a newer owner.
	held := 0
	for {
		m := leases(t, nc)
		taken := true
		held = 0
		for shard, le := range before {
			if le.Owner == "s4" {
				held++
				if m[shard].Owner == "s4" || m[shard].Epoch <= le.Epoch {
					taken = false
				}
			}
		}
		if taken {
			break
		}
		if time.Since(paused) > 2*time.Minute {
			t.Fatal("s4's shards were not taken while it was paused")
		}
		time.Sleep(100 * time.Millisecond)
	}
	takenAfter := time.Since(paused)
	time.Sleep(2 * time.Second) // the others write to the shards meanwhile
	if err := victim.p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// s4 notices it lost its shards.
	var lostMoves, fenced float64
	deadline := time.Now().Add(60 * time.Second)
	for {
		m := scrape(t, victim.metricsPort)
		lostMoves, fenced = m[`kuma_shard_moves_total{direction="lost"}`], m[`kuma_shard_fenced_total{reason="lease"}`]+m[`kuma_shard_fenced_total{reason="epoch"}`]
		if lostMoves >= float64(held) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("s4 gave up %v of its %d shards after waking:\n%s", lostMoves, held, tail(victim.p.logs.String(), 40))
		}
		time.Sleep(200 * time.Millisecond)
	}
	l.waitAcks(t, 1000, 90*time.Second)
	l.finish()
	t.Logf("SIGSTOP of s4 (%d of %d shards): taken by the others %s after the pause; on waking it gave up %v shards and refused %v stale writes; %d appends acknowledged, failed attempts (retried) %d %v",
		held, clusterShards, takenAfter.Round(time.Millisecond), lostMoves, fenced, l.acks.Load(), l.failures.Load(), l.errs)
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	t.Logf("no acknowledged event lost, one writer per entity: verified %d events of %d entities", n, len(l.acked))
}

// scrape reads a node's Prometheus metrics as name{labels} → value.
func scrape(t *testing.T, port int) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	body, err := httpGet("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

func httpGet(url string) (string, error) {
	hc := http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
