package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// TestMain lets the test binary stand in for the kuma binary: with
// KUMA_TEST_AS_MAIN=1 it runs main, so tests can start `kuma up` as a real
// process and signal it, without a separate build.
func TestMain(m *testing.M) {
	if os.Getenv("KUMA_TEST_AS_MAIN") == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

func runCLI(t *testing.T, env map[string]string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(t.Context(), args, strings.NewReader(env["stdin"]), &out, &errb, func(k string) string { return env[k] })
	return out.String(), errb.String(), code
}

func TestClientCommands(t *testing.T) {
	n := kumatest.Start(t, nil)
	env := map[string]string{"KUMA_NATS_URL": n.App.ClientURL()}

	out, errs, code := runCLI(t, env, "append", "user_0x9A4F", "UserCreated", `{"name":"Dwighson","role":"architect"}`)
	if code != 0 {
		t.Fatalf("append exit %d: %s", code, errs)
	}
	var a kuma.AppendReply
	if err := json.Unmarshal([]byte(out), &a); err != nil || a.LastVersion != 1 {
		t.Fatalf("append printed %q (%v)", out, err)
	}
	if _, errs, code = runCLI(t, env, "append", "user_0x9A4F", "UserMoved", `{"city":"Oslo"}`, "--expected-version", "1"); code != 0 {
		t.Fatalf("second append exit %d: %s", code, errs)
	}

	out, _, code = runCLI(t, env, "read", "user_0x9A4F")
	var r kuma.ReadReply
	if err := json.Unmarshal([]byte(out), &r); code != 0 || err != nil || r.Version != 2 || compact(r.State) != `{"city":"Oslo","name":"Dwighson","role":"architect"}` {
		t.Fatalf("read exit %d printed %s", code, out)
	}
	// Flags after the positional argument, as people type them.
	out, _, code = runCLI(t, env, "read", "user_0x9A4F", "--at-version", "1")
	if err := json.Unmarshal([]byte(out), &r); code != 0 || err != nil || r.Version != 1 {
		t.Fatalf("read --at-version 1 exit %d printed %s", code, out)
	}
	out, _, code = runCLI(t, env, "history", "user_0x9A4F", "--limit", "1")
	var h kuma.HistoryReply
	if err := json.Unmarshal([]byte(out), &h); code != 0 || err != nil || len(h.Events) != 1 || h.NextVersion == nil || *h.NextVersion != 2 {
		t.Fatalf("history exit %d printed %s", code, out)
	}
	out, _, code = runCLI(t, env, "export", "user_0x9A4F")
	var x kuma.ExportReply
	if err := json.Unmarshal([]byte(out), &x); code != 0 || err != nil || len(x.Events) != 2 {
		t.Fatalf("export exit %d printed %s", code, out)
	}

	// Failures exit 1 with the protocol error as JSON on stderr.
	for _, tc := range []struct {
		args []string
		code kuma.Code
	}{
		{[]string{"append", "user_0x9A4F", "X", "{}", "--expected-version", "0"}, kuma.CodeVersionConflict},
		{[]string{"read", "nobody"}, kuma.CodeNotFound},
		{[]string{"read", "bad.id"}, kuma.CodeInvalidEntityID},
		{[]string{"append", "e", "9bad"}, kuma.CodeInvalidEvent},
	} {
		out, errs, code := runCLI(t, env, tc.args...)
		var body kuma.ErrorReply
		if code != 1 || out != "" || json.Unmarshal([]byte(errs), &body) != nil || body.Error == nil || body.Error.Code != tc.code {
			t.Fatalf("%v: exit %d stdout %q stderr %q, want exit 1 and %s", tc.args, code, out, errs, tc.code)
		}
	}
	// Usage mistakes exit 2 and say what is wrong.
	for _, args := range [][]string{{"append", "only-entity"}, {"read"}, {"append", "e", "T", "{not json"}, {"read", "e", "--at-time", "noon"}, {"frobnicate"}} {
		if _, errs, code := runCLI(t, env, args...); code != 2 || errs == "" {
			t.Fatalf("%v: exit %d stderr %q, want exit 2 with a message", args, code, errs)
		}
	}
	// --field prints one field for a script; a field the reply lacks is a
	// usage mistake found before the request, so nothing is appended.
	if out, errs, code := runCLI(t, env, "append", "user_0x9A4F", "UserSeen", "--field", "position"); code != 0 || !strings.HasPrefix(out, "p") || strings.ContainsAny(out, `"{`) {
		t.Fatalf("append --field position: exit %d printed %q %s", code, out, errs)
	}
	if out, _, code := runCLI(t, env, "read", "user_0x9A4F", "--field", "version"); code != 0 || out != "3\n" {
		t.Fatalf("read --field version: exit %d printed %q", code, out)
	}
	if _, errs, code := runCLI(t, env, "append", "user_0x9A4F", "UserSeen", "--field", "positon"); code != 2 || !strings.Contains(errs, "position") {
		t.Fatalf("append --field positon: exit %d %s, want exit 2 naming the fields", code, errs)
	}
	if out, _, code := runCLI(t, env, "read", "user_0x9A4F", "--field", "version"); code != 0 || out != "3\n" {
		t.Fatalf("a refused --field appended: read --field version exit %d printed %q", code, out)
	}
	// Flags win over the environment.
	if _, errs, code := runCLI(t, env, "read", "user_0x9A4F", "--nats-url", "nats://127.0.0.1:1", "--timeout", "300ms"); code == 0 || !strings.Contains(errs, "127.0.0.1:1") {
		t.Fatalf("--nats-url did not override KUMA_NATS_URL: exit %d %s", code, errs)
	}
}

// freePort returns a loopback port free now, for a child process to bind.
// It is chosen below the kernel's ephemeral range: a port the kernel hands
// out for ":0" and gets back is soon handed to another process's listener
// or outgoing connection, and the test packages run in parallel, so a node
// started a second later found its port taken ("address already in use",
// seen in CI). Ports below the range are never handed out by the kernel;
// this process remembers its own picks.
func freePort(t *testing.T) int {
	t.Helper()
	lo, hi := 10_000, ephemeralLow()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		if hi-lo < 1000 {
			break // no room below the range: take the kernel's pick
		}
		p := lo + rand.IntN(hi-lo)
		if portsTaken[p] {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		l.Close()
		portsTaken[p] = true
		return p
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

var (
	portsMu    sync.Mutex
	portsTaken = map[int]bool{}
)

// ephemeralLow is the lowest port the kernel hands out for ":0" (Linux's
// ip_local_port_range; 32768 where it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	if f := strings.Fields(string(b)); len(f) == 2 {
		if n, err := strconv.Atoi(f[0]); err == nil {
			return n
		}
	}
	return 32768
}

// logBuffer collects a child's stderr (the shared kumatest.LogBuffer, so
// String is safe while it is written); closed tells when the child's
// stderr has been read to its end.
type logBuffer struct {
	kumatest.LogBuffer
	closed chan struct{}
}

// startUp runs `kuma up` as a child process and waits for its ready line.
func startUp(t *testing.T, dir string, port int, env ...string) (*exec.Cmd, *logBuffer) {
	t.Helper()
	p := spawn(t, []string{"up", "--data", dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(port), "--shards", "4", "--metrics-listen", "127.0.0.1:0"}, env...)
	p.waitReady(t, 60*time.Second)
	return p.cmd, p.logs
}

// proc is a kuma child process: the test binary run as main.
type proc struct {
	cmd   *exec.Cmd
	logs  *logBuffer
	ready chan bool // true once "kuma ready" is logged, false if it exits first
}

// spawn starts `kuma ARGS...` as a child process, collecting its stderr; it
// is killed when the test ends.
func spawn(t *testing.T, args []string, env ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), "KUMA_TEST_AS_MAIN=1"), env...)
	pr, pw, _ := os.Pipe()
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	p := &proc{cmd: cmd, logs: &logBuffer{closed: make(chan struct{})}, ready: make(chan bool, 1)}
	go func() {
		defer close(p.logs.closed)
		sc := bufio.NewScanner(pr)
		sent := false
		for sc.Scan() {
			_, _ = p.logs.Write([]byte(sc.Text() + "\n"))
			if !sent && strings.Contains(sc.Text(), "kuma ready") {
				p.ready <- true
				sent = true
			}
		}
		if !sent {
			p.ready <- false
		}
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

// waitReady waits for the process's ready line, failing the test if it
// exits first or takes longer than limit.
func (p *proc) waitReady(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case ok := <-p.ready:
		if !ok {
			_ = p.cmd.Wait()
			t.Fatalf("kuma %s exited before ready:\n%s", p.cmd.Args[1], p.logs)
		}
	case <-time.After(limit):
		_ = p.cmd.Process.Kill()
		t.Fatalf("kuma %s not ready in time:\n%s", p.cmd.Args[1], p.logs)
	}
}

// TestUpServesStopsOnSIGTERMAndComesBack runs the real `kuma up` process,
// writes through it, stops it with SIGTERM (clean exit 0), starts it on the
// same data dir and reads everything back; then refuses another shard count.
func TestUpServesStopsOnSIGTERMAndComesBack(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	env := map[string]string{"KUMA_NATS_URL": "nats://127.0.0.1:" + strconv.Itoa(port)}
	cmd, logs := startUp(t, dir, port)
	for i := 0; i < 5; i++ {
		if _, errs, code := runCLI(t, env, "append", "meter-1", "Reading", `{"kwh":`+strconv.Itoa(i)+`}`); code != 0 {
			t.Fatalf("append exit %d: %s", code, errs)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("kuma up after SIGTERM: %v\n%s", err, logs)
	}
	<-logs.closed // every line the process wrote is in
	if !strings.Contains(logs.String(), "kuma stopped") {
		t.Fatalf("no clean stop in the logs:\n%s", logs)
	}

	startUp(t, dir, port)
	out, _, code := runCLI(t, env, "read", "meter-1")
	var r kuma.ReadReply
	if err := json.Unmarshal([]byte(out), &r); code != 0 || err != nil || r.Version != 5 || compact(r.State) != `{"kwh":4}` {
		t.Fatalf("after restart read exit %d printed %s", code, out)
	}

	// The data dir remembers its shard count.
	var errb bytes.Buffer
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	code = run(ctx, []string{"up", "--data", dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(freePort(t)), "--shards", "8", "--metrics-listen", "127.0.0.1:0"}, strings.NewReader(""), &bytes.Buffer{}, &errb, func(string) string { return "" })
	if code == 0 || !strings.Contains(errb.String(), "created with 4 shards") {
		t.Fatalf("up with --shards 8 on a 4-shard dir: exit %d, %s", code, errb.String())
	}
}

func compact(b []byte) string {
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return string(b)
	}
	return out.String()
}

// TestForgetCompletesAfterACrash kills `kuma up` (SIGKILL from inside, at a
// failpoint) in the middle of a forget, after the intent is recorded and
// after the key is shredded, and restarts it: the forget is complete, and
// the neighbour entity is untouched.
func TestForgetCompletesAfterACrash(t *testing.T) {
	for _, point := range []string{"forget-after-mark", "forget-after-shred"} {
		t.Run(point, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			port := freePort(t)
			env := map[string]string{"KUMA_NATS_URL": "nats://127.0.0.1:" + strconv.Itoa(port)}
			cmd, logs := startUp(t, dir, port, "KUMA_TEST_FAILPOINT="+point)
			for _, id := range []string{"victim", "neighbour"} {
				if _, errs, code := runCLI(t, env, "append", id, "Joined", `{"email":"x@y.z"}`); code != 0 {
					t.Fatalf("append exit %d: %s", code, errs)
				}
			}
			if _, _, code := runCLI(t, env, "forget", "victim", "--reason", "crash test", "--yes", "--timeout", "3s"); code == 0 {
				t.Fatalf("forget succeeded although the process was to die at %s", point)
			}
			err := cmd.Wait()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("kuma up ended with %v, want killed by SIGKILL at %s\n%s", err, point, logs)
			}

			_, logs = startUp(t, dir, port)
			for _, op := range [][]string{{"read", "victim"}, {"history", "victim"}, {"export", "victim"}, {"append", "victim", "Back"}} {
				_, errs, code := runCLI(t, env, op...)
				if code != 1 || !strings.Contains(errs, "entity_forgotten") {
					t.Fatalf("%v after restart: exit %d %s, want entity_forgotten\n%s", op, code, errs, logs)
				}
			}
			out, errs, code := runCLI(t, env, "forget", "victim", "--yes")
			var f kuma.ForgetReply
			if code != 0 || json.Unmarshal([]byte(out), &f) != nil || f.EventsDeleted != 1 {
				t.Fatalf("forget again: exit %d %s %s", code, out, errs)
			}
			if _, errs, code := runCLI(t, env, "read", "neighbour"); code != 0 {
				t.Fatalf("neighbour after restart: exit %d %s", code, errs)
			}
			if !strings.Contains(logs.String(), "finished an interrupted forget") {
				t.Fatalf("the restart did not report finishing the forget:\n%s", logs)
			}
		})
	}
}

func TestForgetAsksForConfirmation(t *testing.T) {
	n := kumatest.Start(t, nil)
	env := map[string]string{"KUMA_NATS_URL": n.App.ClientURL()}
	if _, errs, code := runCLI(t, env, "append", "someone", "Joined"); code != 0 {
		t.Fatal(errs)
	}
	env["stdin"] = "someone-else\n"
	if _, errs, code := runCLI(t, env, "forget", "someone"); code != 2 || !strings.Contains(errs, "not confirmed") {
		t.Fatalf("forget with the wrong confirmation: exit %d %s", code, errs)
	}
	if _, _, code := runCLI(t, env, "read", "someone"); code != 0 {
		t.Fatal("an unconfirmed forget changed the entity")
	}
	env["stdin"] = "someone\n"
	if out, errs, code := runCLI(t, env, "forget", "someone", "--reason", "asked by phone"); code != 0 || !strings.Contains(out, "forgotten_at") {
		t.Fatalf("confirmed forget: exit %d %s %s", code, out, errs)
	}
	out := filepath.Join(t.TempDir(), "export.json")
	if _, errs, code := runCLI(t, env, "append", "other", "Joined", `{"a":1}`); code != 0 {
		t.Fatal(errs)
	}
	if _, errs, code := runCLI(t, env, "export", "other", "--out", out); code != 0 {
		t.Fatal(errs)
	}
	st, err := os.Stat(out)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("export file %v, %v; want mode 0600", st, err)
	}
}

// TestStreamIsExactAfterACrashAroundPublish kills `kuma up` right before and
// right after the relay's first publish, restarts it, writes more, and checks
// that the stream holds exactly the shard's events: none missing, none twice,
// per entity in version order.
func TestStreamIsExactAfterACrashAroundPublish(t *testing.T) {
	for _, point := range []string{"relay-before-publish", "relay-after-publish"} {
		t.Run(point, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			port := freePort(t)
			url := "nats://127.0.0.1:" + strconv.Itoa(port)
			env := map[string]string{"KUMA_NATS_URL": url}
			cmd, logs := startUp(t, dir, port, "KUMA_TEST_FAILPOINT="+point)
			// The commit is acknowledged before the relay runs, so the reply
			// may or may not get out before the process dies.
			runCLI(t, env, "append", "meter-7", "Reading", `{"kwh":1}`, "--timeout", "2s")
			_ = cmd.Wait()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
				t.Fatalf("kuma up was not killed at %s:\n%s", point, logs)
			}

			startUp(t, dir, port)
			for i := 0; i < 3; i++ {
				if _, errs, code := runCLI(t, env, "append", "meter-7", "Reading", `{"kwh":2}`); code != 0 {
					t.Fatalf("append after restart: %s", errs)
				}
			}
			out, errs, code := runCLI(t, env, "history", "meter-7")
			var h kuma.HistoryReply
			if code != 0 || json.Unmarshal([]byte(out), &h) != nil {
				t.Fatalf("history: exit %d %s", code, errs)
			}
			nc, err := nats.Connect(url)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			got := kumatest.StreamEvents(t, nc, "default", len(h.Events))["meter-7"]
			if len(got) != len(h.Events) {
				t.Fatalf("the stream has %d events of meter-7, the shard %d", len(got), len(h.Events))
			}
			for i, e := range got {
				if e.Version != h.Events[i].Version {
					t.Fatalf("stream event %d is version %d, want %d", i, e.Version, h.Events[i].Version)
				}
			}
		})
	}
}

// TestHistoryCommandFollowsPages: `kuma history --limit N` prints N events
// even when the server cuts its pages by size (20 events of 30 KB under a
// 128 KiB max payload come in five pages or more).
func TestHistoryCommandFollowsPages(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.NATS.MaxPayload = app.MinMaxPayload })
	env := map[string]string{"KUMA_NATS_URL": n.App.ClientURL()}
	c := n.Client(client.Options{})
	for i := 0; i < 20; i++ {
		data := json.RawMessage(fmt.Sprintf(`{"i":%d,"pad":"%s"}`, i, strings.Repeat("z", 30_000)))
		if _, err := c.Append(t.Context(), "paged", []kuma.EventInput{{Type: "Padded", Data: data}}); err != nil {
			t.Fatal(err)
		}
	}
	out, errs, code := runCLI(t, env, "history", "paged", "--limit", "20", "--timeout", "3s")
	var h kuma.HistoryReply
	if err := json.Unmarshal([]byte(out), &h); code != 0 || err != nil {
		t.Fatalf("history exit %d: %s %v", code, errs, err)
	}
	if len(h.Events) != 20 || h.NextVersion != nil || h.Events[19].Version != 20 {
		t.Fatalf("history printed %d events, next %v; want all 20", len(h.Events), h.NextVersion)
	}
	out, errs, code = runCLI(t, env, "history", "paged", "--from", "3", "--limit", "7", "--timeout", "3s")
	if err := json.Unmarshal([]byte(out), &h); code != 0 || err != nil {
		t.Fatalf("history exit %d: %s %v", code, errs, err)
	}
	if len(h.Events) != 7 || h.Events[0].Version != 3 || h.NextVersion == nil || *h.NextVersion != 10 {
		t.Fatalf("history --from 3 --limit 7 printed %d events, next %v; want 3..9, next 10", len(h.Events), h.NextVersion)
	}
}
