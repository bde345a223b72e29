package shardnode_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/damage"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// corruptShards is the shard count of the nodes these tests start
// (kumatest's default).
const corruptShards = 4

// corruptLog collects a node's log lines.
type corruptLog struct{ kumatest.LogBuffer }

// lines returns the log lines that contain every one of subs.
func (l *corruptLog) lines(subs ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		all := line != ""
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			out = append(out, line)
		}
	}
	return out
}

// corruptStart starts an in-process node on dir that logs into logs; tune,
// if given, changes its configuration further.
func corruptStart(t *testing.T, dir string, logs *corruptLog, tune ...func(*app.Config)) *kumatest.Node {
	t.Helper()
	return kumatest.Start(t, func(c *app.Config) {
		c.DataDir = dir
		c.Shards = corruptShards
		c.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		for _, f := range tune {
			f(c)
		}
	})
}

// corruptShardFile is where a node on dir keeps shard n of the default context.
func corruptShardFile(dir string, n int) string {
	return filepath.Join(dir, "default", fmt.Sprintf("shard-%03d.db", n))
}

// corruptEntities returns count entity ids of the given shard.
func corruptEntities(prefix string, shard, count int) []string {
	var out []string
	for i := 0; len(out) < count; i++ {
		id := fmt.Sprintf("%s-%d", prefix, i)
		if placement.ShardOf(id, corruptShards) == shard {
			out = append(out, id)
		}
	}
	return out
}

// corruptAcked is what was acknowledged: each entity's event data in
// version order.
type corruptAcked map[string][]json.RawMessage

// corruptAppend appends n events of about size bytes each to entity and
// records them when acknowledged.
func corruptAppend(ctx context.Context, c *client.Client, acked corruptAcked, entity string, n, size int) (*kuma.AppendReply, error) {
	evs := make([]kuma.EventInput, n)
	datas := make([]json.RawMessage, n)
	for i := range evs {
		v := len(acked[entity]) + i + 1
		datas[i] = json.RawMessage(fmt.Sprintf(`{"entity":%q,"v":%d,"pad":%q}`, entity, v, strings.Repeat("x", size)))
		evs[i] = kuma.EventInput{Type: "Noted", Data: datas[i]}
	}
	r, err := c.Append(ctx, entity, evs)
	if err != nil {
		return nil, err
	}
	acked[entity] = append(acked[entity], datas...)
	return r, nil
}

// corruptSameJSON compares two JSON values.
func corruptSameJSON(a, b json.RawMessage) bool {
	var x, y any
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && reflect.DeepEqual(x, y)
}

// corruptVerify reads every acknowledged entity back: its state and version
// are those of its last acknowledged event, and its history is exactly the
// acknowledged events.
func corruptVerify(ctx context.Context, c *client.Client, acked corruptAcked) error {
	for entity, want := range acked {
		r, err := c.Read(ctx, entity)
		if err != nil {
			return fmt.Errorf("read %s: %w", entity, err)
		}
		if r.Version != int64(len(want)) || !corruptSameJSON(r.State, want[len(want)-1]) {
			return fmt.Errorf("read %s: version %d, want %d (or its state is not the last event's)", entity, r.Version, len(want))
		}
		h, err := c.History(ctx, entity, 1, 1000)
		if err != nil {
			return fmt.Errorf("history %s: %w", entity, err)
		}
		if len(h.Events) != len(want) {
			return fmt.Errorf("history %s: %d events, %d acknowledged", entity, len(h.Events), len(want))
		}
		for i, e := range h.Events {
			if e.Version != int64(i+1) || e.Type != "Noted" || !corruptSameJSON(e.Data, want[i]) {
				return fmt.Errorf("history %s: event %d is not the acknowledged one", entity, i+1)
			}
		}
	}
	return nil
}

// corruptRefused checks that every operation on entity answers the corrupt
// shard's error, and returns no data.
func corruptRefused(ctx context.Context, c *client.Client, entity string, shard int) error {
	want := fmt.Sprintf("shard %d of %q is corrupt; the operator must restore it", shard, "default")
	check := func(op string, err error) error {
		var kerr *kuma.Error
		if !errors.As(err, &kerr) || kerr.Code != kuma.CodeInternal || kerr.Message != want {
			return fmt.Errorf("%s %s: %v; want internal %q", op, entity, err, want)
		}
		return nil
	}
	r, err := c.Read(ctx, entity)
	if err := check("read", err); err != nil {
		return fmt.Errorf("%w (reply %+v)", err, r)
	}
	h, err := c.History(ctx, entity, 1, 100)
	if err := check("history", err); err != nil {
		return fmt.Errorf("%w (reply %+v)", err, h)
	}
	x, err := c.Export(ctx, entity)
	if err := check("export", err); err != nil {
		return fmt.Errorf("%w (reply %+v)", err, x)
	}
	a, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Noted", Data: json.RawMessage(`{"after":"corruption"}`)}})
	if err := check("append", err); err != nil {
		return fmt.Errorf("%w (reply %+v)", err, a)
	}
	return nil
}

// corruptGauge returns kuma_shard_corrupt for the shard (false: absent).
func corruptGauge(t *testing.T, n *kumatest.Node, shard int) (float64, bool) {
	t.Helper()
	fams, err := n.App.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "kuma_shard_corrupt" {
			continue
		}
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["context"] == "default" && labels["shard"] == fmt.Sprint(shard) {
				return m.GetGauge().GetValue(), true
			}
		}
	}
	return 0, false
}

// corruptSettle waits until the relay has published every committed event.
func corruptSettle(t *testing.T, n *kumatest.Node) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		lag := int64(0)
		for _, st := range n.Shardnode().Stats() {
			lag += st.RelayLag
		}
		if lag == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the relay is %d events behind after 20 s", lag)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// corruptWaitRefused polls until entity's shard answers as corrupt.
func corruptWaitRefused(t *testing.T, c *client.Client, entity string, shard int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	for {
		err := corruptRefused(ctx, c, entity, shard)
		if err == nil {
			t.Logf("shard %d answered corrupt after %s of asking", shard, time.Since(start).Round(time.Millisecond))
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("shard %d was not taken out of service: %v", shard, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// corruptWaitLog waits until a log line contains every one of subs.
func corruptWaitLog(t *testing.T, logs *corruptLog, subs ...string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for len(logs.lines(subs...)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q after 20 s", subs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// corruptMoveAside does what the operator does with a corrupt shard file:
// it moves the file (and its WAL and shared memory) out of the data dir.
func corruptMoveAside(t *testing.T, path string) {
	t.Helper()
	aside := t.TempDir()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		err := os.Rename(path+suffix, filepath.Join(aside, filepath.Base(path)+suffix))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
}

// corruptWriteAll appends perEntity events (in batches of 5) to count
// entities of each shard.
func corruptWriteAll(t *testing.T, c *client.Client, count, perEntity, size int) (corruptAcked, map[int][]string) {
	t.Helper()
	ctx := context.Background()
	acked := corruptAcked{}
	byShard := map[int][]string{}
	for shard := 0; shard < corruptShards; shard++ {
		byShard[shard] = corruptEntities("c", shard, count)
		for _, e := range byShard[shard] {
			for v := 0; v < perEntity; v += 5 {
				if _, err := corruptAppend(ctx, c, acked, e, 5, size); err != nil {
					t.Fatalf("append to %s: %v", e, err)
				}
			}
		}
	}
	return acked, byShard
}

// corruptOthers checks that the shards other than bad serve every
// acknowledged event and take appends.
func corruptOthers(ctx context.Context, c *client.Client, acked corruptAcked, byShard map[int][]string, bad int) error {
	others := corruptAcked{}
	for shard, ids := range byShard {
		if shard == bad {
			continue
		}
		for _, e := range ids {
			others[e] = acked[e]
		}
		if _, err := corruptAppend(ctx, c, acked, ids[0], 1, 10); err != nil {
			return fmt.Errorf("append to %s of sound shard %d: %w", ids[0], shard, err)
		}
		others[ids[0]] = acked[ids[0]]
	}
	return corruptVerify(ctx, c, others)
}

// TestCorruptShardFileStopsServing flips the page-type bit of an events leaf
// page of shard 1 while the node is stopped. After a restart the shard is
// found damaged (by the background quick_check or the first read of that
// page), logs one ERROR, shows kuma_shard_corrupt = 1 and a line in status,
// and answers every request for its entities internal, never with data,
// while the other shards serve everything. Moving the file aside and
// restarting rebuilds it from the event stream. Then a page of shard 3
// goes bad under the running node, after its check passed: the first read
// of it takes that shard out of service the same way.
func TestCorruptShardFileStopsServing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	logs := &corruptLog{}
	n := corruptStart(t, dir, logs)
	c := n.Client(client.Options{})
	acked, byShard := corruptWriteAll(t, c, 8, 20, 300)
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("before the damage: %v", err)
	}
	corruptSettle(t, n)
	n.Stop()

	const bad = 1
	path := corruptShardFile(dir, bad)
	page, pageSize, entity := corruptEventsLeaf(t, path)
	damage.Flip(t, path, (page-1)*pageSize, 0x01) // table leaf 0x0d becomes 0x0c: no such page type
	t.Logf("flipped the type bit of page %d of %s (events of %s)", page, filepath.Base(path), entity)

	n.Restart()
	c = n.Client(client.Options{})
	corruptWaitRefused(t, c, entity, bad)
	if err := corruptRefused(ctx, c, byShard[0][0], 0); err == nil {
		t.Fatal("corruptRefused accepted a sound shard's answers") // the checker's negative control
	}
	for _, e := range byShard[bad] {
		if err := corruptRefused(ctx, c, e, bad); err != nil {
			t.Fatal(err)
		}
	}
	if err := corruptOthers(ctx, c, acked, byShard, bad); err != nil {
		t.Fatalf("the other shards: %v", err)
	}
	if v, ok := corruptGauge(t, n, bad); !ok || v != 1 {
		t.Fatalf("kuma_shard_corrupt{shard=%d} = %v (present %v), want 1", bad, v, ok)
	}
	for shard := 0; shard < corruptShards; shard++ {
		if _, ok := corruptGauge(t, n, shard); ok && shard != bad {
			t.Fatalf("kuma_shard_corrupt is set for sound shard %d", shard)
		}
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range st.Shards {
		if got := strings.Contains(line.Error, "corrupt"); got != (line.Shard == bad) {
			t.Fatalf("status of shard %d: error %q", line.Shard, line.Error)
		}
	}
	errs := logs.lines("level=ERROR", "shard file is corrupt", fmt.Sprintf("shard=%d", bad))
	if len(errs) != 1 || !strings.Contains(errs[0], "malformed") {
		t.Fatalf("ERROR lines about the corrupt shard: %q; want one, with SQLite's error", errs)
	}
	if other := logs.lines("level=ERROR", "shard file is corrupt"); len(other) != 1 {
		t.Fatalf("corrupt shards logged: %q; want shard %d only", other, bad)
	}
	t.Logf("logged: %s", errs[0])

	// The operator's remedy: the file goes aside, the shard is rebuilt from
	// the event stream, and every acknowledged event is back.
	n.Stop()
	corruptMoveAside(t, path)
	n.Restart()
	c = n.Client(client.Options{})

	// At runtime, before anything of shard 3 is read since the start.
	const late = 3
	corruptWaitLog(t, logs, "shard file checked", fmt.Sprintf("shard=%d", late))
	latePath := corruptShardFile(dir, late)
	page, pageSize, lateEntity := corruptEventsLeaf(t, latePath)
	damage.Flip(t, latePath, (page-1)*pageSize, 0x01)
	if err := corruptRefused(ctx, c, lateEntity, late); err != nil {
		t.Fatalf("the first read of a page damaged at runtime: %v", err)
	}
	lateErrs := logs.lines("level=ERROR", "shard file is corrupt", fmt.Sprintf("shard=%d", late))
	if len(lateErrs) != 1 || !strings.Contains(lateErrs[0], "read events") {
		t.Fatalf("ERROR lines about shard %d: %q; want one, from the read", late, lateErrs)
	}
	if v, ok := corruptGauge(t, n, late); !ok || v != 1 {
		t.Fatalf("kuma_shard_corrupt{shard=%d} = %v (present %v), want 1", late, v, ok)
	}
	t.Logf("at runtime: %s", lateErrs[0])

	restored := corruptAcked{}
	for e, evs := range acked {
		if !slices.Contains(byShard[late], e) {
			restored[e] = evs
		}
	}
	if err := corruptVerify(ctx, c, restored); err != nil {
		t.Fatalf("after the file was moved aside and rebuilt: %v", err)
	}
	if _, err := corruptAppend(ctx, c, acked, byShard[bad][0], 1, 10); err != nil {
		t.Fatalf("append to the rebuilt shard: %v", err)
	}
	if _, ok := corruptGauge(t, n, bad); ok {
		t.Fatal("kuma_shard_corrupt is still set after the restore")
	}
	t.Logf("%d entities, %d of them on shard %d: refused as corrupt, the rest served; restored from the stream; shard %d found at runtime",
		len(acked), len(byShard[bad]), bad, late)
}

// TestCorruptSealedPayload flips one bit inside one event's sealed payload
// while the node is stopped. Every read of that entity answers internal
// (the AES-GCM tag does not match) and never returns data; the other
// entities of the same shard, and the shard itself, go on.
func TestCorruptSealedPayload(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	logs := &corruptLog{}
	n := corruptStart(t, dir, logs)
	c := n.Client(client.Options{})
	const shard = 0
	ids := corruptEntities("sealed", shard, 2)
	bad, good := ids[0], ids[1]
	acked := corruptAcked{}
	for _, e := range ids {
		if _, err := corruptAppend(ctx, c, acked, e, 5, 50); err != nil {
			t.Fatal(err)
		}
	}
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("before the flip (the control): %v", err)
	}
	corruptSettle(t, n)
	n.Stop()

	path := corruptShardFile(dir, shard)
	db, err := sql.Open("sqlite", sqlite.DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	payload := append([]byte(nil), kumatest.EventPayload(t, db, bad, 3)...)
	payload[len(payload)/2] ^= 0x08
	kumatest.SetEventPayload(t, db, bad, 3, payload)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	n.Restart()
	c = n.Client(client.Options{})
	calls := map[string]func() (any, error){
		"read":         func() (any, error) { return c.Read(ctx, bad) },
		"read at v2":   func() (any, error) { return c.Read(ctx, bad, client.AtVersion(2)) },
		"history":      func() (any, error) { return c.History(ctx, bad, 1, 100) },
		"history from": func() (any, error) { return c.History(ctx, bad, 3, 1) },
		"export":       func() (any, error) { return c.Export(ctx, bad) },
		"append": func() (any, error) {
			return c.Append(ctx, bad, []kuma.EventInput{{Type: "Noted", Data: json.RawMessage(`{}`)}})
		},
	}
	for name, call := range calls {
		reply, err := call()
		var kerr *kuma.Error
		if !errors.As(err, &kerr) || kerr.Code != kuma.CodeInternal || kerr.Message != "internal error" {
			t.Fatalf("%s of %s with a flipped payload: %+v, %v; want internal and no data", name, bad, reply, err)
		}
	}
	if err := corruptVerify(ctx, c, corruptAcked{good: acked[good]}); err != nil {
		t.Fatalf("the other entity of the shard: %v", err)
	}
	if _, err := corruptAppend(ctx, c, acked, good, 1, 10); err != nil {
		t.Fatalf("append to the other entity of the shard: %v", err)
	}
	if _, ok := corruptGauge(t, n, shard); ok {
		t.Fatal("one bad payload took the whole shard out of service")
	}
	if got := logs.lines("level=ERROR", "sealed data does not open", "entity="+bad); len(got) == 0 {
		t.Fatal("no ERROR line names the entity whose payload does not open")
	}
	if got := logs.lines("shard file is corrupt"); len(got) != 0 {
		t.Fatalf("a bad payload was logged as a corrupt shard: %q", got)
	}
}
