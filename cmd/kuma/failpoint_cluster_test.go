//go:build faults

package main

// The mid-migration part of the failpoint suite: a shard move's two halves
// are killed at their failpoints under load. A run takes ten seconds or
// more (a node keeps a shard it has just taken for MinHold, 3 s, before it
// hands it on), so it runs with -tags faults only.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

const fpClusterShards = 4

// fpCluster is `kuma up --node n1` (NATS, keyvault, router, a shardnode)
// and a second shardnode run alone (`kuma serve --target shardnode`) on
// n1's NATS server. Killing the second shardnode takes no NATS server or
// JetStream peer with it, so what is tested is the shard move, not NATS.
type fpCluster struct {
	dir   string
	port  int
	url   string
	other string // the second shardnode's name
	n1    *proc
	s     *proc
	admin *client.Client
}

func fpStartCluster(t *testing.T) *fpCluster {
	t.Helper()
	c := &fpCluster{dir: t.TempDir(), port: freePort(t), other: fpOtherName()}
	c.url = "nats://127.0.0.1:" + strconv.Itoa(c.port)
	c.n1 = spawn(t, []string{"up", "--node", "n1", "--data", filepath.Join(c.dir, "n1"), "--shards", strconv.Itoa(fpClusterShards),
		"--nats-listen", "127.0.0.1:" + strconv.Itoa(c.port), "--metrics-listen", "", "--console-listen", "", "--log-format", "text"})
	c.n1.waitReady(t, 60*time.Second)
	nc, err := nats.Connect(c.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	if c.admin, err = client.New(nc, client.Options{}); err != nil {
		t.Fatal(err)
	}
	return c
}

// fpOtherName is a name for the second shardnode that rendezvous hashing
// gives at least two of the shards, so that its joining moves some.
func fpOtherName() string {
	for i := 2; ; i++ {
		name := "s" + strconv.Itoa(i)
		if len(fpPlaced(name, []string{"n1", name})) >= 2 {
			return name
		}
	}
}

// fpPlaced lists the shards rendezvous hashing over members gives node.
func fpPlaced(node string, members []string) []int {
	var out []int
	for shard := range fpClusterShards {
		if cluster.Rendezvous(kuma.DefaultContext, shard, members) == node {
			out = append(out, shard)
		}
	}
	return out
}

// startOther starts the second shardnode; ready waits for its ready line
// (a take-over failpoint may strike before it).
func (c *fpCluster) startOther(t *testing.T, ready bool, env ...string) {
	t.Helper()
	c.s = spawn(t, []string{"serve", "--target", "shardnode", "--node", c.other, "--data", filepath.Join(c.dir, c.other),
		"--shards", strconv.Itoa(fpClusterShards), "--nats-url", c.url, "--metrics-listen", "", "--log-format", "text"}, env...)
	if ready {
		c.s.waitReady(t, 60*time.Second)
	}
}

// stopOther stops the second shardnode gracefully: it hands its shards to
// n1 and exits 0.
func (c *fpCluster) stopOther(t *testing.T) {
	t.Helper()
	if err := c.s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := c.s.cmd.Wait(); err != nil {
		t.Fatalf("%s after SIGTERM: %v\n%s", c.other, err, tail(c.s.logs.String(), 20))
	}
}

// settle waits until the members are the live nodes and every shard is
// served where it should be (its pin, else rendezvous hashing), with no
// move under way, and returns the shard map.
func (c *fpCluster) settle(t *testing.T, members []string, limit time.Duration) kuma.StatusReply {
	t.Helper()
	var st *kuma.StatusReply
	var err error
	for deadline := time.Now().Add(limit); ; time.Sleep(100 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err = c.admin.Status(ctx)
		cancel()
		if err == nil && fpSettled(st, members) {
			return *st
		}
		if time.Now().After(deadline) {
			var other string
			if c.s != nil {
				other = tail(c.s.logs.String(), 20)
			}
			t.Fatalf("the shards did not settle on %v within %s: %v %+v\nn1:\n%s\n%s:\n%s",
				members, limit, err, st, tail(c.n1.logs.String(), 20), c.other, other)
		}
	}
}

func fpSettled(st *kuma.StatusReply, members []string) bool {
	var names []string
	for _, n := range st.Nodes {
		names = append(names, n.Name)
	}
	slices.Sort(names)
	want := slices.Sorted(slices.Values(members))
	if !slices.Equal(names, want) || len(st.Moves) != 0 || len(st.Shards) != fpClusterShards {
		return false
	}
	for _, s := range st.Shards {
		if s.Owner == "" || s.Owner != s.Desired || s.Moving != "" || s.HandoffTo != "" || s.Error != "" {
			return false
		}
	}
	return true
}

// TestFailpointsMidMigration kills a shard move at each of its failpoints,
// failpointRuns times each, under 32 writers: the handing-off node after it
// stopped serving (before the upload) and after the upload (before it
// released the lease), and the taking node after it took the lease (before
// it restored and served the shard). The killed node is started again;
// then every acknowledged append is there once, versions are contiguous,
// every SQLite file of both nodes passes integrity_check, and the stream
// holds every stored event exactly once.
func TestFailpointsMidMigration(t *testing.T) {
	seed := faultSeed(t, "KUMA_TEST_SEED")
	t.Logf("seed %d (KUMA_TEST_SEED=%[1]d repeats the choices)", seed)
	rng := rand.New(rand.NewPCG(seed, 0x6d696772))
	var all fpFigures
	for _, point := range []string{"handoff-after-stop", "handoff-after-upload", "takeover-after-lease"} {
		t.Run(point, func(t *testing.T) {
			f := fpRunMigration(t, point, rng)
			t.Logf("%s: %s", point, f.String())
			fpAssertClean(t, &f)
			all.add(f)
		})
	}
	t.Logf("all migration points: %s", all.String())
}

// fpRunMigration runs one point failpointRuns times on one cluster, under
// one load, and checks once at the end (and the files at every crash).
func fpRunMigration(t *testing.T, point string, rng *rand.Rand) fpFigures {
	var f fpFigures
	c := fpStartCluster(t)
	nc := connect(t, c.url)
	// Paced (about 300 appends a second in all): the runs of a point share
	// one load, which the final check reads back whole.
	l := startLoad(t, nc, fpLoadConfig(false, 100*time.Millisecond, fpClusterShards))
	l.waitAcks(t, 100, 60*time.Second)
	both := []string{"n1", c.other}
	placed := fpPlaced(c.other, both)
	for run := range failpointRuns {
		start := time.Now()
		var what string
		pinned := -1
		switch point {
		case "takeover-after-lease":
			// The second node joins, n1 hands it its shards one by one,
			// and it dies having taken the Nth lease.
			n := 1 + rng.IntN(len(placed))
			c.startOther(t, false, "KUMA_TEST_FAILPOINT="+point+"@"+strconv.Itoa(n))
			fpWaitKilled(t, c.s.cmd, c.s.logs, point, n, l)
			what = fmt.Sprintf("%s@%d while joining (to take shards %v)", point, n, placed)
		default:
			// The second node serves its shards; kuma migrate moves one
			// of them to n1, and the second node dies handing it off.
			c.startOther(t, true, "KUMA_TEST_FAILPOINT="+point)
			c.settle(t, both, 60*time.Second)
			l.waitAcks(t, int64(1+rng.IntN(600)), 60*time.Second) // a random moment: 0 to 2 s
			pinned = placed[rng.IntN(len(placed))]
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := c.admin.Migrate(ctx, pinned, "n1")
			cancel()
			if err != nil {
				t.Fatalf("migrate shard %d to n1: %v", pinned, err)
			}
			fpWaitKilled(t, c.s.cmd, c.s.logs, point, 1, l)
			what = fmt.Sprintf("%s handing shard %d to n1", point, pinned)
		}
		f.runs++
		f.files += fpIntegrity(t.Context(), filepath.Join(c.dir, c.other), false, &f) // as the crash left them
		killed := time.Since(start)
		c.startOther(t, true)
		c.settle(t, both, 90*time.Second)
		l.waitAcks(t, 2*fpWriterCount, 60*time.Second)
		if pinned >= 0 {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := c.admin.Unpin(ctx, pinned)
			cancel()
			if err != nil {
				t.Fatalf("unpin shard %d: %v", pinned, err)
			}
			c.settle(t, both, 60*time.Second)
		}
		// A graceful stop hands the second node's shards to n1, so that
		// the next run starts from n1 alone again.
		c.stopOther(t)
		c.settle(t, []string{"n1"}, 60*time.Second)
		t.Logf("run %d: killed at %s %s into the run; restarted, settled and stopped again %s later; %d appends acknowledged so far",
			run+1, what, killed.Round(time.Millisecond), (time.Since(start) - killed).Round(time.Millisecond), l.acks.Load())
	}
	l.finishWithin(t, fpGiveUp+30*time.Second)
	fpVerify(t, nc, l, nil, &f)
	if err := c.n1.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := c.n1.cmd.Wait(); err != nil {
		t.Fatalf("n1 after SIGTERM: %v\n%s", err, tail(c.n1.logs.String(), 20))
	}
	for _, node := range []string{"n1", c.other} {
		f.files += fpIntegrity(t.Context(), filepath.Join(c.dir, node), node == "n1", &f)
	}
	t.Logf("%s: %d append attempts failed and were retried with their key", point, l.failures.Load())
	return f
}
