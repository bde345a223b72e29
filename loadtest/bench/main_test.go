package bench

import (
	"bytes"
	"compress/gzip"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

func small() config {
	return config{events: 20_000, writers: 20, batch: 100, entities: 50, shards: 4, conns: 2, payloadBytes: 200,
		sync: "FULL", ctxName: "default", timeout: 30 * time.Second}
}

// TestLoadtestSmall runs the tool end to end on a small workload, with the
// verification pass and the baseline, and checks that what it reports adds
// up.
func TestLoadtestSmall(t *testing.T) {
	var out bytes.Buffer
	c := small()
	c.verify, c.baseline, c.readRatio = true, "sqlite,sqlite-multirow,shard-writer", 0.2
	rep, err := runAll(t.Context(), c, &out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	r := rep.Kuma
	if r.Events != 20_000 || r.Appends != 200 || r.Errors != 0 || !r.Verified || r.Reads == 0 {
		t.Fatalf("result %+v, want 20,000 verified events in 200 appends and some reads", r)
	}
	if r.Append.P50 <= 0 || r.Append.P50 > r.Append.P99 || r.Append.P99 > r.Append.Max || r.EventsSec <= 0 {
		t.Fatalf("percentiles out of order: %+v", r.Append)
	}
	if len(rep.Baselines) != 3 {
		t.Fatalf("%d baselines, want 3", len(rep.Baselines))
	}
	for _, b := range rep.Baselines {
		if b.Events != 20_000 || b.Errors != 0 || b.Ratio <= 0 {
			t.Fatalf("baseline %s: %+v ratio %v", b.Name, b.result, b.Ratio)
		}
	}
	if r.Node == nil || r.Node.CPUSeconds <= 0 || r.Node.RSSBytes <= 0 {
		t.Fatalf("node usage %+v, want CPU and memory measured", r.Node)
	}
	if r.ProjectionsCatchUp < r.StreamCatchUp {
		t.Fatalf("projections caught up at %s, before the stream (%s)", r.ProjectionsCatchUp, r.StreamCatchUp)
	}
	for _, want := range []string{"throughput:", "event stream caught up", "projections (1) caught up", "node:", "verified", "kuma / baseline sqlite:", "kuma / baseline sqlite-multirow:", "kuma / baseline shard-writer:"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("output lacks %q:\n%s", want, out.String())
		}
	}
	t.Log(out.String())
}

// TestLoadtestFixedRate runs a paced (latency) run with reads to the end.
// Reads take slots as appends do: about one per append at a ratio of 0.5
// (negative binomial: 20 plus one per writer at the end, on average), where
// unpaced ones would come by the hundred while the writers wait for slots.
func TestLoadtestFixedRate(t *testing.T) {
	c := small()
	c.events, c.rate, c.readRatio = 2_000, 200, 0.5
	var out bytes.Buffer
	r, err := run(t.Context(), c, &out)
	if err != nil {
		t.Fatal(err)
	}
	if r.Appends != 20 || r.Errors != 0 || r.ReadErrors != 0 || !strings.Contains(out.String(), "200 appends/s") {
		t.Fatalf("%d appends, %d errors, %d failed reads:\n%s", r.Appends, r.Errors, r.ReadErrors, out.String())
	}
	if r.Reads == 0 || r.Reads > 100 {
		t.Fatalf("%d reads with 20 paced appends at a read ratio of 0.5: want them paced too (about 28)", r.Reads)
	}
}

func TestPayloadSize(t *testing.T) {
	for _, n := range []int{50, 200, 1000} {
		p := payload(n)
		if n >= 100 && (len(p) < n-2 || len(p) > n+2) {
			t.Fatalf("payload(%d) is %d bytes", n, len(p))
		}
	}
}

// TestMainFlagsAndJSON runs Main as `kuma bench` would: bad flags exit 2;
// --json prints a report that parses, with the progress bar off.
func TestMainFlagsAndJSON(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Main(t.Context(), "kuma bench", []string{"--writers", "x"}, Options{}, &out, &errb); code != 2 {
		t.Fatalf("bad flag: exit %d, want 2", code)
	}
	out.Reset()
	code := Main(t.Context(), "kuma bench", []string{"--events", "2000", "--writers", "4", "--entities", "10", "--shards", "2",
		"--json", "--progress", "off"}, Options{}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var rep report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil || rep.Kuma == nil || rep.Kuma.Events != 2000 {
		t.Fatalf("--json printed %q (%v)", out.String(), err)
	}
}

// TestRawWriterStoresEveryRow checks the baseline writers store what they
// acknowledge, in both INSERT modes: a baseline that dropped rows would make
// Kuma look slow.
func TestRawWriterStoresEveryRow(t *testing.T) {
	for _, multi := range []bool{false, true} {
		path := filepath.Join(t.TempDir(), "raw.db")
		w, err := openRawWriter(t.Context(), path, "FULL", multi)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for e := range 5 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for b := range 5 {
					vs := make([]int64, 30+e) // not a multiple of the rows per statement
					for i := range vs {
						vs[i] = int64(b*len(vs) + i + 1)
					}
					if err := w.commit(t.Context(), &rawCommit{entity: fmt.Sprint("e", e), versions: vs, payload: []byte("x"), at: 1}); err != nil {
						t.Error(err)
					}
				}
			}()
		}
		wg.Wait()
		if err := w.close(); err != nil {
			t.Fatal(err)
		}
		db, err := sql.Open("sqlite", path)
		if err != nil {
			t.Fatal(err)
		}
		var rows, maxPos, entities int
		err = db.QueryRow(`SELECT COUNT(*), MAX(pos), COUNT(DISTINCT entity) FROM events`).Scan(&rows, &maxPos, &entities)
		db.Close()
		if want := 5 * (30 + 31 + 32 + 33 + 34); err != nil || rows != want || maxPos != want || entities != 5 {
			t.Fatalf("multi=%v: %d rows, last position %d, %d entities (%v); want %d rows, dense, 5 entities", multi, rows, maxPos, entities, err, want)
		}
	}
}

func TestUnknownBaselineIsRefusedBeforeTheRun(t *testing.T) {
	c := small()
	c.baseline = "sqlite,mysql"
	var out bytes.Buffer
	if _, err := runAll(t.Context(), c, &out); err == nil || !strings.Contains(err.Error(), `"mysql"`) || out.Len() != 0 {
		t.Fatalf("err %v, output %q; want the unknown name refused before anything ran", err, out.String())
	}
}

// TestProfilesCoverTheRun writes the CPU and heap profiles of a small
// embedded run: gzip-compressed profile.proto (what pprof reads), not empty.
func TestProfilesCoverTheRun(t *testing.T) {
	c := small()
	dir := t.TempDir()
	c.node, c.cpuProfile, c.heapProfile = "embedded", filepath.Join(dir, "cpu.prof"), filepath.Join(dir, "heap.prof")
	var out bytes.Buffer
	if _, err := runAll(t.Context(), c, &out); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, p := range []string{c.cpuProfile, c.heapProfile} {
		checkProfile(t, p)
	}
}

// checkProfile fails unless path holds a gzip-compressed, non-empty profile.
func checkProfile(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("not a pprof profile: %v", err)
	}
	n, err := io.Copy(io.Discard, zr)
	if err != nil || n < 1000 {
		t.Fatalf("profile of %d bytes (%v): nothing recorded", n, err)
	}
}

func TestHeapProfileOfARemoteNodeNeedsItsMetrics(t *testing.T) {
	var stderr bytes.Buffer
	if code := Main(t.Context(), "bench", []string{"--nats-url", "nats://127.0.0.1:1", "--heapprofile", "x.prof"}, Options{}, io.Discard, &stderr); code != 2 ||
		!strings.Contains(stderr.String(), "--metrics-url") {
		t.Fatalf("exit %d, %q: want a usage error naming --metrics-url", code, stderr.String())
	}
}

// TestRawFollowersCountEveryEvent runs raw followers (--follower-mode raw)
// through a small run: they must count each event once, exactly (the run
// fails below the count; an overcount would show here).
func TestRawFollowersCountEveryEvent(t *testing.T) {
	c := small()
	c.followers, c.followerMode = 3, followRaw
	var out bytes.Buffer
	r, err := run(t.Context(), c, &out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if r.Follow == nil || r.Follow.Mode != followRaw || r.Follow.Events != 3*r.Events || r.Follow.Errors != 0 {
		t.Fatalf("followers %+v, want 3 x %d events\n%s", r.Follow, r.Events, out.String())
	}
}

// TestRawFeedReplyMatchesDecoded reads real feed replies of a node and
// checks the raw count and cursor against encoding/json's, page by page,
// including the empty page at the end.
func TestRawFeedReplyMatchesDecoded(t *testing.T) {
	a, err := app.New(app.Config{DataDir: t.TempDir(), Shards: 2, NATS: natsbus.ServerConfig{Listen: "127.0.0.1:-1"}, Context: "default", Logger: discardLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer a.Stop(context.Background())
	nc, err := nats.Connect(a.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	cl, err := client.New(nc, client.Options{Context: "default"})
	if err != nil {
		t.Fatal(err)
	}
	// Data that mentions "position" as a value and in a nested key's name,
	// but holds no "position" key.
	data := json.RawMessage(`{"note":"position: \"position\"","positions":[1,2]}`)
	for i := range 25 {
		if _, err := cl.Append(t.Context(), fmt.Sprint("user-", i%7), []kuma.EventInput{{Type: "UserUpdated", Data: data}, {Type: "UserUpdated", Data: payload(200)}}); err != nil {
			t.Fatal(err)
		}
	}
	cursor, total := "", 0
	for page := 0; ; page++ {
		body, _ := json.Marshal(kuma.FeedRequest{After: cursor, Limit: 7})
		msg, err := nc.RequestWithContext(t.Context(), kuma.FeedSubject("default"), body)
		if err != nil {
			t.Fatal(err)
		}
		var rep kuma.FeedReply
		if err := json.Unmarshal(msg.Data, &rep); err != nil {
			t.Fatal(err)
		}
		next, ok := feedNext(msg.Data)
		if n := countFeedEvents(msg.Data); n != len(rep.Events) || !ok || next != rep.Next {
			t.Fatalf("page %d: raw count %d and next %q (%v), decoded %d and %q:\n%s", page, n, next, ok, len(rep.Events), rep.Next, msg.Data)
		}
		total += len(rep.Events)
		if len(rep.Events) == 0 {
			break
		}
		cursor = rep.Next
	}
	if total != 50 {
		t.Fatalf("read %d events, want 50", total)
	}
}
