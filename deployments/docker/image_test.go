//go:build docker

// Package docker tests Kuma's container image for real: it builds the image
// (FROM scratch, nothing pulled), runs it, writes and reads through it from
// the host, restarts it on its volume, and stops it. Run with
// `go test -tags docker ./deployments/...`; .ci/run does when `docker info`
// works.
package docker

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

func docker(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("docker", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

func TestImageRunsKuma(t *testing.T) {
	suffix := fmt.Sprintf("%d", time.Now().UnixNano())
	tag, name, volume := "kuma:test-"+suffix, "kuma-test-"+suffix, "kuma-test-"+suffix
	start := time.Now()
	if out, err := exec.Command("bash", "build.sh", tag).CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("docker", "rmi", "-f", tag).Run() })
	t.Logf("image built in %s (%s)", time.Since(start).Round(time.Millisecond), docker(t, "images", tag, "--format", "{{.Size}}"))
	if user := docker(t, "inspect", tag, "--format", "{{.Config.User}}"); user != "65532:65532" {
		t.Fatalf("image runs as %q, want the non-root 65532:65532", user)
	}

	run := func(opts ...string) (natsURL, httpURL string) {
		t.Helper()
		args := append([]string{"run", "-d", "--name", name, "-v", volume + ":/data",
			"-p", "127.0.0.1::4222", "-p", "127.0.0.1::9464"}, opts...)
		docker(t, append(args, tag)...)
		natsURL = "nats://" + docker(t, "port", name, "4222/tcp")
		httpURL = "http://" + docker(t, "port", name, "9464/tcp")
		deadline := time.Now().Add(60 * time.Second)
		for {
			resp, err := http.Get(httpURL + "/readyz")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return natsURL, httpURL
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("the container is not ready:\n%s", docker(t, "logs", name))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	t.Cleanup(func() {
		exec.Command("docker", "rm", "-f", name).Run()
		exec.Command("docker", "volume", "rm", "-f", volume).Run()
	})

	start = time.Now()
	natsURL, _ := run()
	t.Logf("container ready in %s", time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	withClient := func(f func(c *client.Client)) {
		nc, err := nats.Connect(natsURL)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		c, _ := client.New(nc, client.Options{})
		f(c)
	}
	withClient(func(c *client.Client) {
		for i := 0; i < 10; i++ {
			if _, err := c.Append(ctx, "boxed", []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}}); err != nil {
				t.Fatal(err)
			}
		}
	})

	// A clean stop (SIGTERM) exits 0; the volume brings everything back.
	start = time.Now()
	docker(t, "stop", "-t", "30", name)
	if code := docker(t, "inspect", name, "--format", "{{.State.ExitCode}}"); code != "0" {
		t.Fatalf("exit code %s after docker stop:\n%s", code, docker(t, "logs", name))
	}
	t.Logf("stopped cleanly in %s", time.Since(start).Round(time.Millisecond))
	docker(t, "rm", name)
	// Restarted with a memory limit, Go's own limit follows it: 0.9 of it
	// (--memory-limit-ratio's default), read from the container's cgroup.
	natsURL, httpURL := run("--memory", "512m")
	container := uint64(512 << 20)
	if got, want := metric(t, httpURL, "go_gc_gomemlimit_bytes"), float64(uint64(float64(container)*0.9)); got != want {
		t.Fatalf("go_gc_gomemlimit_bytes %.0f in a container of 512 MiB, want %.0f\n%s", got, want, docker(t, "logs", name))
	}
	withClient(func(c *client.Client) {
		r, err := c.Read(ctx, "boxed")
		if err != nil || r.Version != 10 || string(r.State) != `{"i":9}` {
			t.Fatalf("after a restart on the volume: %+v, %v", r, err)
		}
	})
}

// metric reads one unlabelled gauge from the node's /metrics.
func metric(t *testing.T, httpURL, name string) float64 {
	t.Helper()
	resp, err := http.Get(httpURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("no %s in /metrics", name)
	return 0
}
