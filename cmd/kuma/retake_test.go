package main

import (
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRetakeAfterFailedTakeKeepsUnpublishedAcks: a node whose take of its
// own shard fails half-way must, at the next take, still trust its file
// whole. Under local durability an append is acknowledged once it is in
// the shard file, before the stream has it; the take after a restart
// leases the shard again (a new epoch, not serving yet). Killed there, the
// node left a lease that never served; the next take used to trust only
// what the stream confirmed of the file (any copy not of the previous,
// serving epoch), and so dropped the acknowledged events the stream did
// not have yet, though nobody but this node ever wrote the shard.
//
// One shard, so that the killed take is the take of the shard holding the
// acknowledged, unpublished events.
func TestRetakeAfterFailedTakeKeepsUnpublishedAcks(t *testing.T) {
	dir := t.TempDir()
	port := freePort(t)
	args := []string{"up", "--data", dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(port), "--shards", "1",
		"--metrics-listen", "127.0.0.1:0", "--console-listen", ""}

	// 1. Killed right after answering an append the relay has not
	// published: acknowledged, in the file, not in the stream.
	p := spawn(t, args, "KUMA_TEST_FAILPOINT=append-after-ack@40")
	p.waitReady(t, 60*time.Second)
	nc := connect(t, "nats://127.0.0.1:"+strconv.Itoa(port))
	l := startLoad(t, nc, fpLoadConfig(false, 0, 1))
	fpWaitKilled(t, p.cmd, p.logs, "append-after-ack", 40, l)
	acked := l.acks.Load()

	// 2. Started again and killed as it takes the shard back: the lease
	// moved to a new epoch, which never serves.
	p = spawn(t, args, "KUMA_TEST_FAILPOINT=takeover-after-lease")
	fpWaitKilled(t, p.cmd, p.logs, "takeover-after-lease", 1, l)

	// 3. Started again: every acknowledged append is there, once.
	p = spawn(t, args)
	p.waitReady(t, 60*time.Second)
	l.waitAcks(t, acked+2*fpWriterCount, 60*time.Second)
	l.finishWithin(t, fpGiveUp+30*time.Second)
	var f fpFigures
	fpVerify(t, nc, l, nil, &f)
	if strings.Contains(p.logs.String(), "dropped events this node committed but never published") {
		t.Errorf("the retake dropped events of its own file:\n%s", tail(p.logs.String(), 20))
	}
	fpAssertClean(t, &f)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("kuma up after SIGTERM: %v\n%s", err, tail(p.logs.String(), 20))
	}
	t.Logf("%d appends acknowledged before the first kill; %s", acked, f.String())
}
