//go:build cluster

// Multi-process cluster tests: real `kuma up` processes on loopback, each
// with its own embedded NATS server joined into one NATS cluster, under a
// 200-writer load. They take a minute or two each, so they run with
// -tags cluster (.ci/run runs them).

package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

const (
	clusterShards = 16
	writers       = 200
)

// testCluster is a set of `kuma up` nodes joined into one cluster. The
// first node runs the keyvault; the others use it over NATS.
type testCluster struct {
	t          *testing.T
	dir        string
	durability string
	nodes      []*clusterNode
	// masterKeyFile, when set, is given to every node, and every node runs
	// its own keyvault instance on the shared bucket (no --keyvault remote).
	masterKeyFile string
	// routeVia, when set, is the route URL a new node joins an existing
	// one by (the partition test's proxies); nil: the member's own
	// cluster listener.
	routeVia func(from, to *clusterNode) string
	// extraArgs are given to every `kuma up` that add starts.
	extraArgs []string
}

type clusterNode struct {
	name                string
	natsPort, routePort int
	metricsPort         int
	args                []string // what it was started with, to start it again
	p                   *proc
}

func newCluster(t *testing.T, durability string) *testCluster {
	c := &testCluster{t: t, dir: t.TempDir(), durability: durability}
	// KUMA_TEST_LOGS=DIR keeps every node's log there, to read after a run.
	if dir := os.Getenv("KUMA_TEST_LOGS"); dir != "" {
		t.Cleanup(func() {
			for _, n := range c.nodes {
				_ = os.WriteFile(filepath.Join(dir, t.Name()+"-"+n.name+".log"), []byte(n.p.logs.String()), 0o644)
			}
		})
	}
	return c
}

// keyedNodes are the nodes startKeyed starts.
var keyedNodes = []string{"n1", "n2", "n3"}

// startKeyed starts keyedNodes with --durability replicated and one master
// key file, so that every node runs a keyvault instance on the shared
// bucket (none runs with --keyvault remote), and waits until the shards
// have settled. nc reaches the cluster through every node's server but
// those in except.
func startKeyed(t *testing.T, except ...string) (*testCluster, *nats.Conn) {
	t.Helper()
	c := newCluster(t, "replicated")
	c.masterKeyFile = filepath.Join(c.dir, "master.key")
	if err := os.WriteFile(c.masterKeyFile, []byte(base64.StdEncoding.EncodeToString(envelope.NewRandomKey())+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.add(keyedNodes...)
	nc := connect(t, c.urls(except...))
	settle(t, nc, keyedNodes, 60*time.Second)
	return c, nc
}

// add starts nodes that join the first one (or form the cluster, for the
// first ones); it waits until every new node is ready, which for the first
// member means until a second one has joined.
func (c *testCluster) add(names ...string) {
	c.t.Helper()
	var started []*clusterNode
	for _, name := range names {
		n := &clusterNode{name: name, natsPort: freePort(c.t), routePort: freePort(c.t), metricsPort: freePort(c.t)}
		args := []string{"up", "--node", name, "--data", filepath.Join(c.dir, name), "--shards", strconv.Itoa(clusterShards),
			"--nats-listen", "127.0.0.1:" + strconv.Itoa(n.natsPort),
			"--cluster-listen", "127.0.0.1:" + strconv.Itoa(n.routePort),
			"--metrics-listen", "127.0.0.1:" + strconv.Itoa(n.metricsPort),
			"--console-listen", "", "--durability", c.durability, "--log-format", "text"}
		if len(c.nodes) > 0 {
			// Every running member, as docs/cluster.md asks: a new server
			// expects as many JetStream peers as it has routes, so two
			// newcomers naming one member each could bootstrap a meta
			// group of their own.
			var join []string
			for _, m := range c.nodes {
				switch {
				case m.routePort == 0:
				case c.routeVia != nil:
					join = append(join, c.routeVia(n, m))
				default:
					join = append(join, "nats://127.0.0.1:"+strconv.Itoa(m.routePort))
				}
			}
			args = append(args, "--join", strings.Join(join, ","))
			if c.masterKeyFile == "" {
				args = append(args, "--keyvault", "remote")
			}
		}
		if c.masterKeyFile != "" {
			args = append(args, "--master-key-file", c.masterKeyFile)
		}
		args = append(args, c.extraArgs...)
		n.args = args
		n.p = spawn(c.t, args, "KUMA_MASTER_KEY=")
		c.nodes = append(c.nodes, n)
		started = append(started, n)
	}
	for _, n := range started {
		n.p.waitReady(c.t, 90*time.Second)
	}
}

// addShardnode starts `kuma serve --target shardnode`: a shardnode alone,
// connected to the first node's NATS server as a client.
func (c *testCluster) addShardnode(name string) {
	c.t.Helper()
	n := &clusterNode{name: name, metricsPort: freePort(c.t)}
	n.p = spawn(c.t, []string{"serve", "--target", "shardnode", "--node", name, "--data", filepath.Join(c.dir, name),
		"--shards", strconv.Itoa(clusterShards), "--nats-url", "nats://127.0.0.1:" + strconv.Itoa(c.nodes[0].natsPort),
		"--metrics-listen", "127.0.0.1:" + strconv.Itoa(n.metricsPort), "--durability", c.durability, "--log-format", "text"})
	c.nodes = append(c.nodes, n)
	n.p.waitReady(c.t, 90*time.Second)
}

func (c *testCluster) node(name string) *clusterNode {
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	c.t.Fatalf("no node %s", name)
	return nil
}

// urls lists the client URLs of the nodes still running.
func (c *testCluster) urls(except ...string) string {
	var out []string
	for _, n := range c.nodes {
		if n.natsPort != 0 && !contains(except, n.name) {
			out = append(out, "nats://127.0.0.1:"+strconv.Itoa(n.natsPort))
		}
	}
	return strings.Join(out, ",")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// leases reads the shard map from the leases bucket. Right after a server
// is lost the bucket may not answer for a few seconds (its stream elects a
// new leader): it tries again for up to 30 s.
func leases(t *testing.T, nc *nats.Conn) map[int]cluster.Lease {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		m, err := readLeases(ctx, js)
		cancel()
		if err == nil {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("read the leases: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// readLeases reads the bucket through a watch (a consumer, served by the
// stream's leader) rather than gets: a get may be served by any replica,
// and a replica on a paused server never answers.
func readLeases(ctx context.Context, js jetstream.JetStream) (map[int]cluster.Lease, error) {
	kv, err := js.KeyValue(ctx, cluster.LeasesBucket)
	if err != nil {
		return nil, err
	}
	w, err := kv.Watch(ctx, "lease."+kuma.DefaultContext+".*")
	if err != nil {
		return nil, err
	}
	defer func() { _ = w.Stop() }()
	out := map[int]cluster.Lease{}
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e := <-w.Updates():
			if e == nil {
				return out, nil // the current values are all in
			}
			if e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var l cluster.Lease
			if err := json.Unmarshal(e.Value(), &l); err != nil {
				return nil, err
			}
			out[l.Shard] = l
		}
	}
}

// settle waits until every shard is leased to the node rendezvous hashing
// over names gives it, with no hand-off pending, and returns the map.
func settle(t *testing.T, nc *nats.Conn, names []string, limit time.Duration) map[int]cluster.Lease {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		m := leases(t, nc)
		done := len(m) == clusterShards
		for shard := range clusterShards {
			l := m[shard]
			if l.Owner != cluster.Rendezvous(kuma.DefaultContext, shard, names) || l.HandoffTo != "" {
				done = false
			}
		}
		if done {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("shards did not settle on %v within %s: %v", names, limit, m)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// streamHasOneWriter reads the event stream: kumatest.StreamEvents fails on
// a shard position repeated or out of order, and here every (entity,
// version) must appear once. Two writers of one shard would break both.
func streamHasOneWriter(t *testing.T, nc *nats.Conn, want int) {
	t.Helper()
	seen := map[string]bool{}
	for entity, events := range kumatest.StreamEvents(t, nc, kuma.DefaultContext, want) {
		for _, e := range events {
			k := entity + "@" + strconv.FormatInt(e.Version, 10)
			if seen[k] {
				t.Fatalf("the stream holds %s twice: two writers", k)
			}
			seen[k] = true
		}
	}
}

func intsToStrings(in []int) []string {
	out := make([]string, len(in))
	for i, v := range in {
		out[i] = strconv.Itoa(v)
	}
	return out
}
