//go:build docker

// Package compose tests deployments/compose/docker-compose.yml for real: it
// builds the image (FROM scratch, nothing pulled), starts the three-node
// cluster with Compose (docker compose, or docker-compose 1.29), writes and
// reads from the host through kuma1's published port, adds two shardnode replicas under a steady load (three
// shardnode members become five: the three kuma up nodes' own and two
// `kuma serve --target shardnode`), kills one kuma up node (not the
// keyvault's) and checks its shards are served again, stops the
// shardnodes (SIGTERM hands their shards off), starts the killed node
// again, checks every acknowledged event, stops the whole cluster (every
// container must exit 0), then removes everything with `down -v`. Run with
// `go test -tags docker ./deployments/...`; .ci/run does when `docker info`
// works.
package compose

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if imageTag != "" {
		exec.Command("docker", "rmi", "-f", imageTag).Run()
	}
	os.Exit(code)
}

func TestComposeCluster(tt *testing.T) {
	p, port, t := newProject(tt, "docker-compose.yml")
	start := time.Now()
	p.must(3*time.Minute, "up", "-d")
	c, status := connect(t, port)
	st, _ := waitSettled(t, status, "three kuma up nodes sharing the shards", 3)
	t.Logf("three nodes up, shards settled, %s after docker-compose up", time.Since(start).Round(time.Millisecond))

	// From the host, through kuma1's published port.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := 0; i < 20; i++ {
		if _, err := c.Append(ctx, fmt.Sprintf("host-%d", i), []kuma.EventInput{{Type: "Created", Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))}}); err != nil {
			t.Fatalf("append from the host: %v", err)
		}
	}
	for i := 0; i < 20; i++ {
		r, err := c.Read(ctx, fmt.Sprintf("host-%d", i))
		if err != nil || r.Version != 1 || string(r.State) != fmt.Sprintf(`{"n":%d}`, i) {
			t.Fatalf("read host-%d = %+v, %v", i, r, err)
		}
	}

	// Two shardnode replicas join under a steady load: three shardnode
	// members become five.
	before := owners(st)
	acked := map[string]int64{}
	l := startLoad(c, 8, "steady", acked)
	time.Sleep(2 * time.Second)
	start = time.Now()
	p.must(3*time.Minute, "up", "-d", "--no-recreate", "--scale", "shardnode=2")
	st, scaled := waitSettled(t, status, "five shardnode members, shards settled", 5)
	time.Sleep(2 * time.Second)
	l.end()
	after := owners(st)
	moved := 0
	newcomers := map[string]int{}
	for n, o := range after {
		if o != before[n] {
			moved++
		}
		if !slices.Contains([]string{"kuma1", "kuma2", "kuma3"}, o) {
			newcomers[o]++
		}
	}
	t.Logf("scale shardnode 0→2: settled %s after docker-compose up --scale began (%s after it returned); %d of %d shards moved, newcomers hold %v; under load %d appends acknowledged, %d failed",
		time.Since(start).Round(time.Millisecond), scaled.Round(time.Millisecond), moved, shards, newcomers, l.ok.Load(), l.fail.Load())
	// Container names are random, so rendezvous hashing may give a
	// newcomer no shard at all (about 3% a node for 16 shards over five):
	// what must hold is that each holds what hashing gives it.
	if got, want := nodeShards(st), placed(st); !maps.Equal(got, want) {
		t.Errorf("shards per node %v, rendezvous hashing over the members gives %v", got, want)
	}
	if len(newcomers) != 2 {
		t.Logf("rendezvous hashing gave a newcomer no shard this time: %v", newcomers)
	}
	for n, o := range after {
		if o != before[n] && newcomers[o] == 0 {
			t.Errorf("shard %d moved from %s to %s, an old member: rendezvous hashing moves shards only to newcomers", n, before[n], o)
		}
	}
	if l.fail.Load() != 0 {
		t.Errorf("%d requests failed while the shardnodes joined: %v", l.fail.Load(), l.errs[:min(len(l.errs), 5)])
	}
	if l.ok.Load() == 0 {
		t.Fatal("the load made no append")
	}

	// Kill one kuma up node that is not the keyvault's (kuma1's), under load.
	victim := "kuma3"
	var lost []int
	for n, o := range after {
		if o == victim {
			lost = append(lost, n)
		}
	}
	if len(lost) == 0 {
		victim = "kuma2"
		for n, o := range after {
			if o == victim {
				lost = append(lost, n)
			}
		}
	}
	slices.Sort(lost)
	if len(lost) == 0 {
		t.Fatalf("neither kuma2 nor kuma3 owns a shard: %v", after)
	}
	container := p.must(time.Minute, "ps", "-q", victim)
	l = startLoad(c, 8, "steady", acked)
	time.Sleep(2 * time.Second)
	start = time.Now()
	if out, err := exec.Command("docker", "kill", container).CombinedOutput(); err != nil {
		t.Fatalf("docker kill %s: %v\n%s", victim, err, out)
	}
	// Its shards are served again once another node owns each of them and
	// answers a read of an entity there.
	probe := map[int]string{}
	for i := 0; len(probe) < len(lost); i++ {
		e := fmt.Sprintf("probe-%d", i)
		if n := placement.ShardOf(e, shards); slices.Contains(lost, n) && probe[n] == "" {
			probe[n] = e
		}
	}
	served := waitFor(t, "the killed node's shards served again", 2*time.Minute, func() string {
		var why string
		if st, why = status(); why != "" {
			return why
		}
		for _, n := range lost {
			if o := owners(st)[n]; o == "" || o == victim {
				return fmt.Sprintf("shard %d owned by %q", n, o)
			}
		}
		for n, e := range probe {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			_, err := c.Append(ctx, e, []kuma.EventInput{{Type: "Probe", Data: json.RawMessage(`{}`)}}, client.IdempotencyKey(e))
			cancel()
			if err != nil {
				return fmt.Sprintf("shard %d: append %s: %v", n, e, err)
			}
		}
		return ""
	})
	time.Sleep(2 * time.Second)
	l.end()
	state, _ := exec.Command("docker", "inspect", "-f", "{{.State.Status}}, restarted {{.RestartCount}} times", container).CombinedOutput()
	t.Logf("docker kill %s (shards %v): served again by %v %s after the kill; under load %d appends acknowledged, %d failed and retried with the same key; the killed container: %s",
		victim, lost, owners(st), served.Round(time.Millisecond), l.ok.Load(), l.fail.Load(), strings.TrimSpace(string(state)))

	// docker-compose stop sends the shardnodes SIGTERM, which hands their
	// shards off first: under load, no request fails, and they exit 0.
	// (up --scale would also start the killed kuma3 again.)
	shardnodes := strings.Fields(p.must(time.Minute, "ps", "-q", "shardnode"))
	l = startLoad(c, 8, "steady", acked)
	time.Sleep(2 * time.Second)
	start = time.Now()
	p.must(3*time.Minute, "stop", "shardnode")
	st, _ = waitSettled(t, status, "the shards back on the two kuma up nodes left", 2)
	time.Sleep(2 * time.Second)
	l.end()
	t.Logf("docker-compose stop shardnode (SIGTERM to 2): shards settled on %v %s after it began; under load %d appends acknowledged, %d failed",
		nodeShards(st), time.Since(start).Round(time.Millisecond), l.ok.Load(), l.fail.Load())
	if l.fail.Load() != 0 {
		t.Errorf("%d requests failed while the shardnodes handed their shards off: %v", l.fail.Load(), l.errs[:min(len(l.errs), 5)])
	}
	for _, id := range shardnodes {
		out, err := exec.Command("docker", "inspect", "-f", "{{.State.ExitCode}}", id).CombinedOutput()
		if code := strings.TrimSpace(string(out)); err != nil || code != "0" {
			t.Errorf("shardnode container %.12s exited with %s (%v) after SIGTERM, want 0", id, code, err)
		}
	}

	// The killed node, started again on its volume, rejoins (it names the
	// others in --join) and takes its share back.
	start = time.Now()
	p.must(3*time.Minute, "start", victim)
	st, _ = waitSettled(t, status, victim+" back in the cluster", 3)
	t.Logf("docker-compose start %s: shards settled on %v %s later", victim, nodeShards(st), time.Since(start).Round(time.Millisecond))

	// No acknowledged event lost, none twice: entity e's version v holds i = v-1.
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for e, n := range acked {
		r, err := c.Read(ctx, e)
		if err != nil {
			t.Fatalf("read %s: %v", e, err)
		}
		var s struct{ I int64 }
		_ = json.Unmarshal(r.State, &s)
		if r.Version < n || s.I != r.Version-1 {
			t.Errorf("%s: version %d, state %s; %d appends were acknowledged", e, r.Version, r.State, n)
		}
	}
	for i := 0; i < 20; i++ {
		if r, err := c.Read(ctx, fmt.Sprintf("host-%d", i)); err != nil || r.Version != 1 {
			t.Errorf("read host-%d after the kill = %+v, %v", i, r, err)
		}
	}

	p.cleanStop()
}
