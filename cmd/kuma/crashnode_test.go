package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// crashNode is one `kuma up` process on its own data dir and NATS port,
// killed and started again on both.
type crashNode struct {
	t        *testing.T
	dir      string
	port     int
	args     []string
	p        *proc
	restarts []time.Duration // kill to ready, per restart
}

func crashStartNode(t *testing.T, sync string) *crashNode {
	t.Helper()
	n := &crashNode{t: t, dir: filepath.Join(t.TempDir(), "data"), port: freePort(t)}
	n.args = []string{"up", "--data", n.dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(n.port),
		"--shards", strconv.Itoa(crashShards), "--sync", sync,
		"--metrics-listen", "127.0.0.1:0", "--console-listen", "", "--log-format", "text"}
	n.p = spawn(t, n.args)
	n.p.waitReady(t, 60*time.Second)
	return n
}

func (n *crashNode) url() string { return "nats://127.0.0.1:" + strconv.Itoa(n.port) }

// kill sends SIGKILL and waits for the process to be gone.
func (n *crashNode) kill() {
	n.t.Helper()
	if err := n.p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		n.t.Fatal(err)
	}
	_ = n.p.cmd.Wait()
	if ws, ok := n.p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		n.t.Fatalf("kuma up ended with %v, want killed by SIGKILL\n%s", n.p.cmd.ProcessState, tail(n.p.logs.String(), 40))
	}
}

// restart starts the process again on the same data dir and port and waits
// until it is ready.
func (n *crashNode) restart(killed time.Time) {
	n.t.Helper()
	n.p = spawn(n.t, n.args)
	n.p.waitReady(n.t, 90*time.Second)
	n.restarts = append(n.restarts, time.Since(killed))
}

func (n *crashNode) restartFigures() string {
	if len(n.restarts) == 0 {
		return "no restart"
	}
	s := append([]time.Duration(nil), n.restarts...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return fmt.Sprintf("kill to ready %s..%s (median %s)", s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond))
}

// crashProgress remembers, per entity, the last version a check after a
// restart has seen in order: the next check reads from there (that event
// again, to see it is still there) instead of the whole history.
type crashProgress struct {
	verified map[string]int64
}

// afterRestart checks, for every writer, that its entity's versions are
// contiguous, each carrying its append once, up to at least what was
// acknowledged before the check began. The writers keep writing meanwhile;
// 16 entities are read at a time so that the check stays short under load.
func (p *crashProgress) afterRestart(ctx context.Context, l *load) *loadFindings {
	acked := l.ackedSnapshot()
	entities := make([]string, 0, len(acked))
	for e := range acked {
		entities = append(entities, e)
	}
	found := make([]loadFindings, len(entities))
	last := make([]int64, len(entities))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i, e := range entities {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			from := max(1, p.verified[e])
			last[i] = l.checkEntity(ctx, &found[i], e, from, acked[e], max(from, acked[e]))
		}()
	}
	wg.Wait()
	f := &loadFindings{}
	for i, e := range entities {
		f.add(&found[i])
		if found[i].ok() && last[i] >= max(1, p.verified[e]) {
			p.verified[e] = last[i]
		}
	}
	return f
}
