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
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go"
)

const shards = 16 // the image's default, which the compose file keeps

// project runs Compose on one project with the test's environment.
type project struct {
	t       testing.TB
	compose []string // the command: docker compose, or docker-compose
	file    string
	name    string
	env     []string
}

// composeCommand is how Compose is run here: KUMA_COMPOSE if set ("docker
// compose" or "docker-compose"), else Docker's v2 plugin where it is
// installed, else the standalone docker-compose (1.29 on the project's
// machine). The files are written for both.
func composeCommand(t testing.TB) []string {
	t.Helper()
	if c := strings.Fields(os.Getenv("KUMA_COMPOSE")); len(c) > 0 {
		return c
	}
	if exec.Command("docker", "compose", "version").Run() == nil {
		return []string{"docker", "compose"}
	}
	if _, err := exec.LookPath("docker-compose"); err != nil {
		t.Fatalf("neither docker compose nor docker-compose is installed: %v", err)
	}
	return []string{"docker-compose"}
}

func (p *project) run(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.compose[0], append(append(p.compose[1:], "-p", p.name, "-f", p.file), args...)...)
	cmd.Env = append(os.Environ(), p.env...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (p *project) must(timeout time.Duration, args ...string) string {
	p.t.Helper()
	out, err := p.run(timeout, args...)
	if err != nil {
		p.t.Fatalf("%s %s: %v\n%s", strings.Join(p.compose, " "), strings.Join(args, " "), err, out)
	}
	return out
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond until it returns "" (done) or the deadline passes, and
// fails with cond's last reason.
func waitFor(t testing.TB, what string, limit time.Duration, cond func() string) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		why := cond()
		if why == "" {
			return time.Since(start)
		}
		if time.Since(start) > limit {
			t.Fatalf("%s: not after %s: %s", what, limit, why)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// owners maps each shard to its owner, "" for a shard between owners.
func owners(st *kuma.StatusReply) map[int]string {
	m := map[int]string{}
	for _, s := range st.Shards {
		m[s.Shard] = s.Owner
	}
	return m
}

// settled says why the cluster is not settled: every shard owned by a live
// node where it should be, nothing moving, want nodes.
func settled(st *kuma.StatusReply, wantNodes int) string {
	if len(st.Nodes) != wantNodes {
		return fmt.Sprintf("%d nodes, want %d", len(st.Nodes), wantNodes)
	}
	if len(st.Shards) != shards {
		return fmt.Sprintf("%d shards in the map, want %d", len(st.Shards), shards)
	}
	for _, s := range st.Shards {
		if s.Owner == "" || s.Owner != s.Desired || s.Moving != "" {
			return fmt.Sprintf("shard %d: owner %q, desired %q, moving %q", s.Shard, s.Owner, s.Desired, s.Moving)
		}
	}
	return ""
}

// load is a few writers appending one event at a time to their own
// entities, each event {"i": i} for the i-th append of that entity, with
// the client's retries (one idempotency key per append). It counts what
// failed outright.
type load struct {
	c        *client.Client
	stop     chan struct{}
	wg       sync.WaitGroup
	ok, fail atomic.Int64
	mu       sync.Mutex
	acked    map[string]int64 // entity → acknowledged appends
	errs     []string
}

func startLoad(c *client.Client, writers int, prefix string, acked map[string]int64) *load {
	l := &load{c: c, stop: make(chan struct{}), acked: acked}
	for w := 0; w < writers; w++ {
		entity := fmt.Sprintf("%s-%d", prefix, w)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				l.mu.Lock()
				i := l.acked[entity]
				l.mu.Unlock()
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				_, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}},
					client.IdempotencyKey(fmt.Sprintf("%s/%d", entity, i)))
				cancel()
				if err != nil {
					l.fail.Add(1)
					l.mu.Lock()
					l.errs = append(l.errs, fmt.Sprintf("%s #%d: %v", entity, i, err))
					l.mu.Unlock()
					continue // the same key again: safe
				}
				l.ok.Add(1)
				l.mu.Lock()
				l.acked[entity] = i + 1
				l.mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *load) end() { close(l.stop); l.wg.Wait() }

// The image both tests run, built once by the first (build.sh, as
// deployments/docker's test does) and removed by TestMain.
var (
	imageOnce sync.Once
	imageTag  string
	imageErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if imageTag != "" {
		exec.Command("docker", "rmi", "-f", imageTag).Run()
	}
	os.Exit(code)
}

func image(t testing.TB) string {
	t.Helper()
	imageOnce.Do(func() {
		tag := fmt.Sprintf("kuma:compose-%d", time.Now().UnixNano())
		start := time.Now()
		out, err := exec.Command("bash", "../docker/build.sh", tag).CombinedOutput()
		if err != nil {
			imageErr = fmt.Errorf("build: %v\n%s", err, out)
			return
		}
		imageTag = tag
		t.Logf("image %s built in %s", tag, time.Since(start).Round(time.Millisecond))
	})
	if imageErr != nil {
		t.Fatal(imageErr)
	}
	return imageTag
}

// newProject prepares a docker-compose project of file with a unique name,
// kuma's client port published on a free loopback port, and a fresh master
// key; its cleanup prints the logs of a failed test and runs down -v.
func newProject(tt *testing.T, file string) (*project, int, testing.TB) {
	tt.Helper()
	t := &recorder{TB: tt}
	compose := composeCommand(t)
	tag := image(t)
	port := freePort(t)
	p := &project{t: t, compose: compose, file: file, name: fmt.Sprintf("kumatest%d", time.Now().UnixNano()), env: []string{
		"KUMA_IMAGE=" + tag,
		fmt.Sprintf("KUMA_PORT=%d", port),
		"KUMA_MASTER_KEY=" + base64.StdEncoding.EncodeToString(envelope.NewRandomKey()),
		"KUMA_DURABILITY=replicated",
	}}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := p.run(time.Minute, "logs", "--no-color", "--tail", "60")
			t.Logf("logs:\n%s", out)
			// The logs push the failure out of sight of a CI summary,
			// which shows the end of the output: say it again.
			t.Logf("the failure, again after the logs: %s", strings.Join(t.failures(), "; "))
		}
		start := time.Now()
		if out, err := p.run(3*time.Minute, "down", "-v", "--timeout", "10"); err != nil {
			t.Errorf("docker-compose down -v: %v\n%s", err, out)
		}
		t.Logf("docker-compose down -v in %s", time.Since(start).Round(time.Millisecond))
	})
	return p, port, t
}

// recorder keeps the test's error messages so that newProject's cleanup
// can repeat them after the containers' logs.
type recorder struct {
	testing.TB
	mu   sync.Mutex
	msgs []string
}

func (r *recorder) note(msg string) {
	r.mu.Lock()
	r.msgs = append(r.msgs, msg)
	r.mu.Unlock()
}

func (r *recorder) failures() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.msgs)
}

func (r *recorder) Errorf(format string, args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprintf(format, args...))
	r.TB.Errorf(format, args...)
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprintf(format, args...))
	r.TB.Fatalf(format, args...)
}

func (r *recorder) Error(args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprint(args...))
	r.TB.Error(args...)
}

func (r *recorder) Fatal(args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprint(args...))
	r.TB.Fatal(args...)
}

// connect is a client through the published port, and a status call.
func connect(t testing.TB, port int) (*client.Client, func() (*kuma.StatusReply, string)) {
	nc, err := nats.Connect(fmt.Sprintf("nats://127.0.0.1:%d", port), nats.RetryOnFailedConnect(true), nats.MaxReconnects(-1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	c, err := client.New(nc, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return c, func() (*kuma.StatusReply, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := c.Status(ctx)
		if err != nil {
			return nil, err.Error()
		}
		return st, ""
	}
}

// waitSettled waits until status shows nodes members and every shard
// settled (see settled), and returns that status and how long it took.
func waitSettled(t testing.TB, status func() (*kuma.StatusReply, string), what string, nodes int) (*kuma.StatusReply, time.Duration) {
	t.Helper()
	var st *kuma.StatusReply
	took := waitFor(t, what, 3*time.Minute, func() string {
		var why string
		if st, why = status(); why != "" {
			return why
		}
		return settled(st, nodes)
	})
	return st, took
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

// cleanStop stops the whole project as an operator does (compose stop: SIGTERM,
// then SIGKILL once the service's stop_grace_period has passed) and checks
// that every container exited 0 by itself: one still running at the end of
// its grace period is killed and exits 137, so exit 0 is "stopped cleanly
// within its grace period", with no clock read here.
func (p *project) cleanStop() {
	t := p.t
	t.Helper()
	ids := strings.Fields(p.must(time.Minute, "ps", "-q"))
	if len(ids) == 0 {
		t.Fatal("compose ps lists no container to stop")
	}
	start := time.Now()
	p.must(5*time.Minute, "stop")
	t.Logf("compose stop of %d containers returned in %s", len(ids), time.Since(start).Round(time.Millisecond))
	for _, id := range ids {
		out, err := exec.Command("docker", "inspect", "-f", "{{.Name}} {{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}", id).CombinedOutput()
		f := strings.Fields(string(out))
		if err != nil || len(f) != 4 {
			t.Errorf("docker inspect %.12s: %v %s", id, err, out)
			continue
		}
		if f[1] != "exited" || f[2] != "0" || f[3] != "false" {
			t.Errorf("container %s after compose stop: %s, exit code %s, OOM-killed %s; want exited 0 (137 is the SIGKILL at the end of the grace period)", f[0], f[1], f[2], f[3])
		}
	}
}

// TestComposeMicroservices runs docker-compose.micro.yml: three NATS servers
// of our image (kuma serve --target nats) in one cluster, one keyvault,
// three shardnodes, a projector and two routers, each its own container.
// From the host it appends, reads and queries the projector's read model,
// then scales the shardnodes from three to four.
func TestComposeMicroservices(tt *testing.T) {
	p, port, t := newProject(tt, "docker-compose.micro.yml")
	start := time.Now()
	p.must(3*time.Minute, "up", "-d")
	c, status := connect(t, port)
	st, _ := waitSettled(t, status, "three shardnodes sharing the shards", 3)
	t.Logf("microservices up (%s), shards settled on 3 shardnodes %s after docker-compose up",
		strings.ReplaceAll(p.must(time.Minute, "ps", "--services"), "\n", " "), time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var last *kuma.AppendReply
	for i := 0; i < 20; i++ {
		ar, err := c.Append(ctx, fmt.Sprintf("micro-%d", i), []kuma.EventInput{{Type: "Created", Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))}})
		if err != nil {
			t.Fatalf("append from the host: %v", err)
		}
		last = ar
	}
	for i := 0; i < 20; i++ {
		r, err := c.Read(ctx, fmt.Sprintf("micro-%d", i))
		if err != nil || r.Version != 1 || string(r.State) != fmt.Sprintf(`{"n":%d}`, i) {
			t.Fatalf("read micro-%d = %+v, %v", i, r, err)
		}
	}
	// The projector (its own container) opens the sealed events through the
	// keyvault (another container) to keep its read model.
	// After waits for the last append's shard; the other shards' events
	// may land a moment later.
	projected := waitFor(t, "the projector's entities read model", time.Minute, func() string {
		q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: last.Position})
		if err != nil {
			return err.Error()
		}
		if len(q.Rows) != 20 {
			return fmt.Sprintf("%d rows, want 20", len(q.Rows))
		}
		return ""
	})
	t.Logf("the projector's read model held all 20 entities %s after the last append", projected.Round(time.Millisecond))

	start = time.Now()
	p.must(3*time.Minute, "up", "-d", "--no-recreate", "--scale", "shardnode=4")
	st, _ = waitSettled(t, status, "four shardnodes sharing the shards", 4)
	t.Logf("shardnode 3→4: settled %s after docker-compose up --scale began; shards per node %v", time.Since(start).Round(time.Millisecond), nodeShards(st))
	// Rendezvous hashing may leave one of four randomly named nodes with
	// no shard (about 1% a node for 16 shards): each holds what hashing
	// gives it, and the newcomer took some unless hashing gave it none.
	if got, want := nodeShards(st), placed(st); !maps.Equal(got, want) {
		t.Errorf("shards per node %v after the scale, rendezvous hashing over the members gives %v", got, want)
	}
	for i := 0; i < 20; i++ {
		if r, err := c.Read(ctx, fmt.Sprintf("micro-%d", i)); err != nil || r.Version != 1 {
			t.Fatalf("read micro-%d after the scale = %+v, %v", i, r, err)
		}
	}

	p.cleanStop()
}

// placed is how many shards rendezvous hashing gives each member of st
// (no operator pins in these tests).
func placed(st *kuma.StatusReply) map[string]int {
	var names []string
	for _, n := range st.Nodes {
		names = append(names, n.Name)
	}
	m := map[string]int{}
	for _, n := range names {
		m[n] = 0
	}
	for s := range shards {
		m[cluster.Rendezvous(kuma.DefaultContext, s, names)]++
	}
	return m
}

func nodeShards(st *kuma.StatusReply) map[string]int {
	m := map[string]int{}
	for _, n := range st.Nodes {
		m[n.Name] = n.Shards
	}
	return m
}
