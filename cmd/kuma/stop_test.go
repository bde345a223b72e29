//go:build cluster

// Stopping a whole cluster (issue 18, item 5): `docker-compose stop` sends
// SIGTERM to every node at once, and each must exit 0 within the grace
// period without waiting on peers that are stopping too, losing nothing
// acknowledged.

package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// stopGrace is the longest a node may take to stop. docker-compose's
// default grace period is 10 s (then it SIGKILLs the container), and a
// node aims for that (docs/cluster.md has the times seen); the bound here
// leaves room for a loaded 2-core test machine.
const stopGrace = 15 * time.Second

// stopResult is how one node's process ended after its SIGTERM.
type stopResult struct {
	name   string
	took   time.Duration // SIGTERM to exit
	code   int           // -1: killed at the end of the grace period
	killed bool
}

// TestStopWholeClusterAtOnce: three replicated nodes under a 200-writer
// load get SIGTERM at the same moment. Each exits 0 within the grace
// period; started again, the cluster holds every acknowledged event once,
// versions contiguous, one writer per entity.
func TestStopWholeClusterAtOnce(t *testing.T) {
	stopWholeCluster(t, 0)
}

// TestStopWholeClusterOneByOne: the same, with the SIGTERMs 1 s apart, so
// the first node hands its shards to peers that are about to stop.
func TestStopWholeClusterOneByOne(t *testing.T) {
	stopWholeCluster(t, time.Second)
}

// TestStopOneOfThreeUnderLoad: the graceful stop of one node while the
// others stay is what it was: it hands its shards to them, no client
// request fails, it exits 0 within the grace period, and nothing
// acknowledged is lost.
func TestStopOneOfThreeUnderLoad(t *testing.T) {
	c := newCluster(t, "replicated")
	names := []string{"n1", "n2", "n3"}
	c.add(names...)
	nc := connect(t, c.urls("n3")) // the load does not go through the leaving node's server
	settle(t, nc, names, 60*time.Second)
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards})
	l.waitAcks(t, 2000, 60*time.Second)
	n3 := c.node("n3")
	if err := n3.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r := waitStopped(n3, time.Now(), stopGrace+5*time.Second)
	if r.killed || r.code != 0 || r.took > stopGrace {
		t.Errorf("n3 did not stop cleanly within %s: %s\nits last log lines:\n%s", stopGrace, r, tail(n3.p.logs.String(), 30))
	}
	settle(t, nc, []string{"n1", "n2"}, 60*time.Second)
	l.waitAcks(t, 2000, 60*time.Second)
	l.finish()
	t.Logf("SIGTERM to n3 of three under load: %s; %d appends acknowledged, append p99 %s, failed requests %d %v",
		r, l.acks.Load(), l.p99().Round(time.Millisecond), l.failures.Load(), l.errs)
	if f := l.failures.Load(); f != 0 {
		t.Errorf("%d client requests failed during the stop: %v\n%s", f, l.errs, strings.Join(l.samples, "\n"))
	}
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	t.Logf("no acknowledged event lost: verified %d events of %d entities", n, len(l.acked))
}

func stopWholeCluster(t *testing.T, apart time.Duration) {
	c := newCluster(t, "replicated")
	names := []string{"n1", "n2", "n3"}
	c.add(names...)
	nc := connect(t, c.urls())
	settle(t, nc, names, 60*time.Second)
	l := startLoad(t, nc, loadConfig{writers: writers, shards: clusterShards, attempt: 5 * time.Second})
	l.waitAcks(t, 2000, 60*time.Second)

	results := make([]stopResult, len(c.nodes))
	var wg sync.WaitGroup
	for i, n := range c.nodes {
		if i > 0 {
			time.Sleep(apart)
		}
		if err := n.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		sent := time.Now()
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = waitStopped(n, sent, stopGrace+5*time.Second)
		}()
	}
	wg.Wait()
	acked := l.acks.Load()
	l.interrupt() // nothing answers now: end the attempts in flight
	l.finish()

	var figures []string
	for i, r := range results {
		figures = append(figures, r.String())
		if r.killed || r.code != 0 || r.took > stopGrace {
			t.Errorf("%s did not stop cleanly within %s: %s\nits last log lines:\n%s", r.name, stopGrace, r, stopTail(c.nodes[i].p.logs.String()))
		}
	}
	t.Logf("SIGTERM to all three nodes %s apart under load (%d appends acknowledged): %s", apart, acked, strings.Join(figures, "; "))

	// Started again on the same data and ports, the cluster serves every
	// shard and has lost nothing.
	start := time.Now()
	c.restart(names...)
	settle(t, nc, names, 90*time.Second)
	t.Logf("restarted and settled in %s", time.Since(start).Round(time.Millisecond))
	n := l.verify(t)
	streamHasOneWriter(t, nc, n)
	t.Logf("no acknowledged event lost: verified %d events of %d entities", n, len(l.acked))
}

// waitStopped waits for n's process to exit, killing it after limit.
func waitStopped(n *clusterNode, sent time.Time, limit time.Duration) stopResult {
	done := make(chan error, 1)
	go func() { done <- n.p.cmd.Wait() }()
	r := stopResult{name: n.name}
	var err error
	select {
	case err = <-done:
	case <-time.After(limit):
		// SIGQUIT first: the Go runtime prints every goroutine's stack, so
		// the log shows what the stop waits on.
		_ = n.p.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case err = <-done:
		case <-time.After(3 * time.Second):
			_ = n.p.cmd.Process.Kill()
			err = <-done
		}
		r.killed = true
	}
	r.took = time.Since(sent)
	var exit *exec.ExitError
	switch {
	case err == nil:
		r.code = 0
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	default:
		r.code = -1
	}
	return r
}

// stopTail is the end of a node's log, and with a goroutine dump (a node
// that did not stop) the stacks of the goroutines in Kuma's own code.
func stopTail(logs string) string {
	i := strings.Index(logs, "SIGQUIT")
	if i < 0 {
		return tail(logs, 30)
	}
	var stuck []string
	for _, g := range strings.Split(logs[i:], "\n\n") {
		if strings.Contains(g, "kuma/services/") || strings.Contains(g, "kuma/pkg/") {
			stuck = append(stuck, g)
		}
	}
	return tail(logs[:i], 30) + "\ngoroutines in Kuma's code:\n" + strings.Join(stuck, "\n\n")
}

func (r stopResult) String() string {
	if r.killed {
		return r.name + " still running after " + r.took.Round(time.Millisecond).String() + ", killed"
	}
	return r.name + " exited " + strconv.Itoa(r.code) + " after " + r.took.Round(time.Millisecond).String()
}

// restart starts stopped nodes again with their first arguments (same data
// directory and ports) and waits until each is ready.
func (c *testCluster) restart(names ...string) {
	c.t.Helper()
	var started []*clusterNode
	for _, name := range names {
		n := c.node(name)
		if dir := os.Getenv("KUMA_TEST_LOGS"); dir != "" {
			_ = os.WriteFile(filepath.Join(dir, c.t.Name()+"-"+n.name+"-before-restart.log"), []byte(n.p.logs.String()), 0o644)
		}
		n.p = spawn(c.t, n.args, "KUMA_MASTER_KEY=")
		started = append(started, n)
	}
	// A node that exits before it is ready is started again (at most
	// twice), as a restart policy would, and said so: after a stop of the
	// whole cluster a projector's start can time out while the restarted
	// JetStream elects its consumers' leaders ("start projector: context
	// deadline exceeded"), which is not what these tests are about.
	for _, n := range started {
		for attempt := 1; ; attempt++ {
			var ok bool
			select {
			case ok = <-n.p.ready:
			case <-time.After(90 * time.Second):
				c.t.Fatalf("%s not ready in time after the restart:\n%s", n.name, n.p.logs)
			}
			if ok {
				break
			}
			_ = n.p.cmd.Wait()
			if attempt == 3 {
				c.t.Fatalf("%s exited before ready three times after the restart:\n%s", n.name, n.p.logs)
			}
			c.t.Logf("restart: %s exited before ready (%s); starting it again", n.name, tail(n.p.logs.String(), 1))
			n.p = spawn(c.t, n.args, "KUMA_MASTER_KEY=")
		}
	}
}
