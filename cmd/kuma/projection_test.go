package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

const countingYAML = `projections:
  - name: counts
    tables:
      - CREATE TABLE totals (entity TEXT PRIMARY KEY, events INTEGER NOT NULL, amount INTEGER NOT NULL)
    on:
      Deposited: INSERT INTO totals (entity, events, amount) VALUES (:entity, 1, :amount) ON CONFLICT (entity) DO UPDATE SET events = events + 1, amount = amount + excluded.amount
    queries:
      totals:
        sql: SELECT count(*) AS entities, coalesce(sum(events), 0) AS events, coalesce(sum(amount), 0) AS amount FROM totals
`

// TestProjectionIsExactAfterACrash kills `kuma up` (SIGKILL) while a
// counting projection applies under a stream of writes, before an apply and
// after one (committed, not acknowledged), restarts it, and checks the totals
// equal the writes exactly: no double count, no missing event.
func TestProjectionIsExactAfterACrash(t *testing.T) {
	for _, point := range []string{"projector-before-apply", "projector-after-apply"} {
		t.Run(point, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			file := filepath.Join(t.TempDir(), "projections.yaml")
			if err := os.WriteFile(file, []byte(countingYAML), 0o600); err != nil {
				t.Fatal(err)
			}
			port := freePort(t)
			url := "nats://127.0.0.1:" + strconv.Itoa(port)
			cmd, logs := startUp(t, dir, port, "KUMA_TEST_FAILPOINT="+point, "KUMA_PROJECTIONS="+file)

			nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			c, _ := client.New(nc, client.Options{Timeout: 2 * time.Second})
			const writes = 200
			want := 0
			done := make(chan error, 1)
			go func() {
				// Each write is retried with its idempotency key until it is
				// acknowledged, across the crash: exactly-once writes.
				for i := range writes {
					deadline := time.Now().Add(60 * time.Second)
					for {
						_, err := c.Append(t.Context(), fmt.Sprintf("acct-%d", i%20),
							[]kuma.EventInput{{Type: "Deposited", Data: json.RawMessage(fmt.Sprintf(`{"amount":%d}`, i))}},
							client.IdempotencyKey(fmt.Sprintf("w-%d", i)))
						if err == nil {
							break
						}
						if time.Now().After(deadline) {
							done <- fmt.Errorf("write %d: %w", i, err)
							return
						}
						time.Sleep(50 * time.Millisecond)
					}
				}
				done <- nil
			}()
			for i := range writes {
				want += i
			}
			_ = cmd.Wait()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
				t.Fatalf("kuma up was not killed at %s:\n%s", point, logs)
			}
			startUp(t, dir, port, "KUMA_PROJECTIONS="+file)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			var totals map[string]any
			deadline := time.Now().Add(30 * time.Second)
			for {
				q, err := c.Query(t.Context(), "counts", &kuma.QueryRequest{Query: "totals"})
				if err == nil {
					totals = q.Rows[0]
					if totals["events"] == float64(writes) {
						break
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("totals %v (%v); want %d events", totals, err, writes)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if totals["amount"] != float64(want) || totals["entities"] != float64(20) {
				t.Fatalf("totals %v; want 20 entities, %d events, amount %d", totals, writes, want)
			}
		})
	}
}

// TestUpRefusesABadProjectionsFile: a mistake is reported with its file,
// line and fix, and nothing starts.
func TestUpRefusesABadProjectionsFile(t *testing.T) {
	cases := []struct {
		name string
		from *strings.Replacer
		want []string
	}{
		{"a column typo", strings.NewReplacer("VALUES (:entity, 1, :amount)", "VALUES (:entity, 1, :amout)", "amount = amount + excluded.amount", "amout = amount + excluded.amount"),
			[]string{":6:", "amout", "fix:", "entity, events, amount"}},
		{"a key typo", strings.NewReplacer("queries:", "querys:"), []string{":7:", "querys", "did you mean queries"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "projections.yaml")
			if err := os.WriteFile(file, []byte(tc.from.Replace(countingYAML)), 0o600); err != nil {
				t.Fatal(err)
			}
			data := t.TempDir()
			_, errs, code := runCLI(t, map[string]string{}, "up", "--data", data, "--nats-listen", "127.0.0.1:-1",
				"--metrics-listen", "", "--projections", file)
			if code == 0 {
				t.Fatal("kuma up started with a broken projections file")
			}
			for _, want := range append(tc.want, file) {
				if !strings.Contains(errs, want) {
					t.Errorf("the error output lacks %q:\n%s", want, errs)
				}
			}
			if strings.Contains(errs, "goroutine") || strings.Contains(errs, "started") {
				t.Errorf("something started, or a stack trace was printed:\n%s", errs)
			}
			if entries, _ := os.ReadDir(data); len(entries) != 0 {
				t.Errorf("the data dir was written to: %v", entries)
			}
		})
	}
}

// TestBenchStartsItsOwnNode runs `kuma bench` as users do: it starts
// `kuma up` in a process of its own, writes, verifies every acknowledged
// event, reports the node's own CPU and memory, and takes the node's CPU and
// heap profiles through its /debug/pprof.
func TestBenchStartsItsOwnNode(t *testing.T) {
	t.Setenv("KUMA_TEST_AS_MAIN", "1") // the child is this test binary standing in for kuma
	dir := t.TempDir()
	cpu, heap := filepath.Join(dir, "cpu.prof"), filepath.Join(dir, "heap.prof")
	out, errs, code := runCLI(t, map[string]string{}, "bench", "--events", "4000", "--writers", "8", "--entities", "20",
		"--shards", "2", "--verify", "--progress", "off", "--cpuprofile", cpu, "--profile-window", "1s", "--heapprofile", heap)
	if code != 0 {
		t.Fatalf("exit %d:\n%s\n%s", code, out, errs)
	}
	for _, want := range []string{"node: kuma up (pid", "acknowledged 4000 events", "verified", "(the node's process, from its /metrics)",
		"CPU profile of the node", "heap profile of the node"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, p := range []string{cpu, heap} {
		b, err := os.ReadFile(p)
		if err != nil || len(b) < 100 || b[0] != 0x1f || b[1] != 0x8b {
			t.Errorf("%s: %d bytes (%v), want a gzipped pprof profile", p, len(b), err)
		}
	}
}
