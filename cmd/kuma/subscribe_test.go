package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// feedLines decodes kuma subscribe's stdout.
func feedLines(t *testing.T, out string) []kuma.FeedEvent {
	t.Helper()
	var evs []kuma.FeedEvent
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var e kuma.FeedEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("not a JSON event line: %q", line)
		}
		evs = append(evs, e)
	}
	return evs
}

func TestSubscribeCommand(t *testing.T) {
	n := kumatest.Start(t, nil)
	env := map[string]string{"KUMA_NATS_URL": n.App.ClientURL()}
	for i := range 6 {
		id := []string{"user_1", "order_1"}[i%2]
		if _, errs, code := runCLI(t, env, "append", id, []string{"Joined", "Paid"}[i%2], fmt.Sprintf(`{"i":%d}`, i)); code != 0 {
			t.Fatal(errs)
		}
	}
	cursorFile := filepath.Join(t.TempDir(), "cursor")
	out, errs, code := runCLI(t, env, "subscribe", "--catch-up-only", "--cursor-file", cursorFile, "--limit", "2")
	if evs := feedLines(t, out); code != 0 || len(evs) != 6 || !strings.Contains(errs, "resume with --after f1.") {
		t.Fatalf("catch-up: exit %d, %d events, stderr %q", code, len(evs), errs)
	}
	// From the stored cursor: only what came since.
	if _, errs, code := runCLI(t, env, "append", "user_2", "Joined"); code != 0 {
		t.Fatal(errs)
	}
	out, _, code = runCLI(t, env, "subscribe", "--catch-up-only", "--cursor-file", cursorFile)
	if evs := feedLines(t, out); code != 0 || len(evs) != 1 || evs[0].Entity != "user_2" {
		t.Fatalf("resumed from the cursor file: exit %d, %q", code, out)
	}
	out, _, code = runCLI(t, env, "subscribe", "--catch-up-only", "--from-start", "--prefix", "user_", "--type", "Joined")
	if evs := feedLines(t, out); code != 0 || len(evs) != 4 {
		t.Fatalf("filtered: exit %d, %q", code, out)
	}
	out, _, code = runCLI(t, env, "subscribe", "--catch-up-only", "--from-end")
	if code != 0 || strings.TrimSpace(out) != "" {
		t.Fatalf("from the end: exit %d, %q", code, out)
	}
	for _, args := range [][]string{
		{"subscribe", "--from-end", "--from-start"},
		{"subscribe", "--after", "x", "--from-end"},
		{"subscribe", "extra"},
	} {
		if _, errs, code := runCLI(t, env, args...); code != 2 || errs == "" {
			t.Fatalf("%v: exit %d %q, want 2 with a message", args, code, errs)
		}
	}
	_, errs, code = runCLI(t, env, "subscribe", "--after", "garbage", "--catch-up-only")
	if code != 1 || !strings.Contains(errs, "bad_request") {
		t.Fatalf("a malformed cursor: exit %d %q", code, errs)
	}
}

// TestSubscribeStopsCleanlyOnCtrlC runs `kuma subscribe` as a process,
// waits for it to print a live event, and interrupts it: exit 0, and the
// cursor to resume from on stderr.
func TestSubscribeStopsCleanlyOnCtrlC(t *testing.T) {
	n := kumatest.Start(t, nil)
	cmd := exec.Command(os.Args[0], "subscribe", "--from-end", "--wait", "2s")
	cmd.Env = append(os.Environ(), "KUMA_TEST_AS_MAIN=1", "KUMA_NATS_URL="+n.App.ClientURL())
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	lines := make(chan string, 8)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	c := n.Client(client.Options{})
	deadline := time.After(30 * time.Second)
	for got := false; !got; {
		if _, err := c.Append(t.Context(), "live-1", []kuma.EventInput{{Type: "Ping"}}); err != nil {
			t.Fatal(err)
		}
		select {
		case l := <-lines:
			got = strings.Contains(l, `"live-1"`)
		case <-time.After(500 * time.Millisecond): // not subscribed yet: append again
		case <-deadline:
			t.Fatal("kuma subscribe printed no live event")
		}
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("kuma subscribe after Ctrl-C: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "resume with --after f1.") {
		t.Fatalf("no resume cursor on stderr: %q", stderr.String())
	}
}

// TestFollowAcrossKill9 follows a real `kuma up` while a writer appends,
// kills the node with SIGKILL and starts it again: the follower, resuming
// on its own, sees every acknowledged event exactly once per (entity,
// version), in version order.
func TestFollowAcrossKill9(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	url := "nats://127.0.0.1:" + strconv.Itoa(port)
	cmd, logs := startUp(t, dir, port)
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c, err := client.New(nc, client.Options{Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	acked := map[string]int64{}
	seen := map[string]int64{}
	var problems []string
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	followed := make(chan struct{})
	go func() {
		defer close(followed)
		_, _ = c.Follow(ctx, client.FollowOptions{Wait: time.Second}, func(e kuma.FeedEvent) error {
			mu.Lock()
			defer mu.Unlock()
			switch last := seen[e.Entity]; {
			case e.Version <= last: // at least once: a repeat after a resume is allowed
			case e.Version != last+1:
				problems = append(problems, fmt.Sprintf("%s: v%d after v%d", e.Entity, e.Version, last))
			default:
				seen[e.Entity] = e.Version
			}
			return nil
		})
	}()
	write := func(rounds int) {
		for i := range rounds {
			id := fmt.Sprintf("k9-%d", i%8)
			rep, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(`{}`)}}, client.IdempotencyKey(fmt.Sprintf("%s-%d", id, i)))
			if err != nil {
				continue // in flight across the kill: not acknowledged
			}
			mu.Lock()
			acked[id] = max(acked[id], rep.LastVersion)
			mu.Unlock()
		}
	}
	write(80)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	startUp(t, dir, port)
	write(80)
	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		caught := true
		for id, v := range acked {
			if seen[id] < v {
				caught = false
			}
		}
		mu.Unlock()
		if caught {
			break
		}
		if time.Now().After(deadline) {
			mu.Lock()
			t.Fatalf("the follower is behind: acked %v, seen %v\n%s", acked, seen, tail(logs.String(), 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
	cancel()
	<-followed
	if len(problems) > 0 {
		t.Fatalf("out of order: %v", problems)
	}
}
