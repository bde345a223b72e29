//go:build docker

package compose

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
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

// The image both tests run, built once by the first (build.sh, as
// deployments/docker's test does) and removed by TestMain.
var (
	imageOnce sync.Once
	imageTag  string
	imageErr  error
)

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
