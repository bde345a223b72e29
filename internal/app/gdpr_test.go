package app_test

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/vaultclient"
	_ "modernc.org/sqlite"
)

const marker = "ZEBRA-MARKER-7f3c9a"

// sameShard returns n entity ids that all live on one shard.
func sameShard(prefix string, n, shards int) []string {
	var out []string
	want := -1
	for i := 0; len(out) < n; i++ {
		id := fmt.Sprintf("%s-%d", prefix, i)
		s := placement.ShardOf(id, shards)
		if want == -1 {
			want = s
		}
		if s == want {
			out = append(out, id)
		}
	}
	return out
}

// filesContaining lists the files under dir whose bytes contain s, leaving
// out the directories named in skip.
func filesContaining(t *testing.T, dir, s string, skip ...string) []string {
	t.Helper()
	var hits []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && slices.Contains(skip, d.Name()) {
			return filepath.SkipDir
		}
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(s)) {
			hits = append(hits, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hits
}

func markerEvents(n int) []kuma.EventInput {
	evs := make([]kuma.EventInput, n)
	for i := range evs {
		evs[i] = kuma.EventInput{Type: "Noted", Data: json.RawMessage(fmt.Sprintf(`{"note":"%s","i":%d}`, marker, i))}
	}
	return evs
}

// TestMarkerIsNeverAtRest writes a distinctive marker in event data (enough
// events for snapshots too) and finds it in no file of the event store (the
// shards, the keyvault, the JetStream store), while the node runs and after it
// stops, although reads return it. Read models are the exception by design:
// they exist to be queried, so they hold state in the clear; forget reaches
// them (TestForgetLeavesTheMarkerNowhere).
func TestMarkerIsNeverAtRest(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) { c.Shardnode.SnapshotEvery = 5 })
	c := n.Client(client.Options{})
	for i := 0; i < 4; i++ {
		if _, err := c.Append(t.Context(), "subject-1", markerEvents(7)); err != nil {
			t.Fatal(err)
		}
	}
	r, err := c.Read(t.Context(), "subject-1")
	if err != nil || !strings.Contains(string(r.State), marker) {
		t.Fatalf("read = %+v, %v; the marker must read back", r, err)
	}
	kumatest.StreamEvents(t, n.NC, "default", 28) // the JetStream store holds them too
	if hits := filesContaining(t, n.Cfg.DataDir, marker, "projector"); len(hits) > 0 {
		t.Fatalf("marker found at rest while running in %v", hits)
	}
	n.Stop()
	if hits := filesContaining(t, n.Cfg.DataDir, marker, "projector"); len(hits) > 0 {
		t.Fatalf("marker found at rest after stop in %v", hits)
	}
	// The check can fail: the marker is there in the clear in a plain file.
	probe := filepath.Join(n.Cfg.DataDir, "probe.txt")
	if err := os.WriteFile(probe, []byte("x"+marker), 0o600); err != nil {
		t.Fatal(err)
	}
	if hits := filesContaining(t, n.Cfg.DataDir, marker, "projector"); len(hits) != 1 {
		t.Fatalf("negative control: found the marker in %v, want exactly the probe", hits)
	}
}

// TestForgetLeavesTheMarkerNowhere: once an entity is forgotten, its data
// is in no file under the data dir, read models included (the entities
// projection and a declared one), while running and after stop.
func TestForgetLeavesTheMarkerNowhere(t *testing.T) {
	n := kumatest.Start(t, func(c *app.Config) {
		c.Shardnode.SnapshotEvery = 5
		c.Projections = []projection.Spec{{
			Name:    "notes",
			Tables:  []string{`CREATE TABLE notes (entity TEXT NOT NULL, note TEXT NOT NULL)`},
			On:      map[string]string{"Noted": `INSERT INTO notes (entity, note) VALUES (:entity, :note)`},
			Forget:  `DELETE FROM notes WHERE entity = :entity`,
			Queries: map[string]projection.Query{"of": {SQL: `SELECT note FROM notes WHERE entity = :entity`}},
		}}
	})
	c := n.Client(client.Options{})
	var last *kuma.AppendReply
	for i := 0; i < 4; i++ {
		var err error
		if last, err = c.Append(t.Context(), "subject-1", markerEvents(7)); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"entities", "notes"} {
		req := &kuma.QueryRequest{After: last.Position}
		if p == "notes" {
			req.Query, req.Params = "of", map[string]json.RawMessage{"entity": json.RawMessage(`"subject-1"`)}
		}
		if _, err := c.Query(t.Context(), p, req); err != nil {
			t.Fatal(err)
		}
	}
	// The check can fail: the read models hold the marker now.
	if hits := filesContaining(t, n.Cfg.DataDir, marker); len(hits) == 0 {
		t.Fatal("the read models do not hold the marker before forget: the check below would prove nothing")
	}
	if _, err := c.Forget(t.Context(), "subject-1", "test", ""); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		hits := filesContaining(t, n.Cfg.DataDir, marker)
		if len(hits) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after forget, the marker is still in %v", hits)
		}
		time.Sleep(20 * time.Millisecond)
	}
	n.Stop()
	if hits := filesContaining(t, n.Cfg.DataDir, marker); len(hits) > 0 {
		t.Fatalf("after forget and stop, the marker is in %v", hits)
	}
}

// TestForgetOverTheWire checks forget's protocol with raw NATS requests.
func TestForgetOverTheWire(t *testing.T) {
	n := kumatest.Start(t, nil)
	ids := sameShard("person", 2, n.Cfg.Shards)
	gone, kept := ids[0], ids[1]
	for _, id := range ids {
		wantOK(t, request(t, n.NC, "kuma.default.append."+id, `{"events":[{"type":"Joined","data":{"email":"a@b.c"}},{"type":"Moved","data":{"city":"Oslo"}}]}`), &kuma.AppendReply{})
	}
	wantError(t, request(t, n.NC, "kuma.default.forget."+gone, `{"reason":"x","Reason":"y"}`), kuma.CodeBadRequest)
	wantError(t, request(t, n.NC, "kuma.default.forget."+gone, `{"reason":"`+strings.Repeat("r", kuma.MaxForgetReasonLen+1)+`"}`), kuma.CodeBadRequest)
	wantError(t, request(t, n.NC, "kuma.default.forget.never-written", `{}`), kuma.CodeNotFound)

	var f1, f2 kuma.ForgetReply
	wantOK(t, request(t, n.NC, "kuma.default.forget."+gone, `{"reason":"GDPR art. 17 request #1234"}`), &f1)
	if f1.Entity != gone || f1.EventsDeleted != 2 || f1.ForgottenAt.IsZero() {
		t.Fatalf("forget reply = %+v", f1)
	}
	for _, op := range []string{"read", "history", "export"} {
		wantError(t, request(t, n.NC, "kuma.default."+op+"."+gone, ``), kuma.CodeEntityForgotten)
	}
	wantError(t, request(t, n.NC, "kuma.default.append."+gone, `{"events":[{"type":"Back"}]}`), kuma.CodeEntityForgotten)
	wantOK(t, request(t, n.NC, "kuma.default.forget."+gone, `{}`), &f2)
	if f2 != f1 {
		t.Fatalf("forget again = %+v, want the same reply %+v", f2, f1)
	}
	var r kuma.ReadReply
	wantOK(t, request(t, n.NC, "kuma.default.read."+kept, ``), &r)
	if r.Version != 2 || string(r.State) != `{"city":"Oslo","email":"a@b.c"}` {
		t.Fatalf("neighbour on the same shard = %+v", r)
	}

	// Across passivation and restart it stays forgotten, and the rows are gone.
	n.Restart()
	for _, op := range []string{"read", "history", "export"} {
		wantError(t, request(t, n.NC, "kuma.default."+op+"."+gone, ``), kuma.CodeEntityForgotten)
	}
	wantError(t, request(t, n.NC, "kuma.default.append."+gone, `{"events":[{"type":"Back"}],"expected_version":0}`), kuma.CodeEntityForgotten)
	wantOK(t, request(t, n.NC, "kuma.default.forget."+gone, ``), &f2)
	if f2 != f1 {
		t.Fatalf("forget after restart = %+v, want %+v", f2, f1)
	}
	n.Stop()
	db := openShardFile(t, n, placement.ShardOf(gone, n.Cfg.Shards))
	for _, table := range []string{"events", "snapshots", "idempotency", "entities", "forget_pending"} {
		var cnt int
		if err := db.QueryRow(`SELECT COUNT(*) FROM `+table+` WHERE entity = ?`, gone).Scan(&cnt); err != nil {
			t.Fatal(err)
		}
		if cnt != 0 {
			t.Fatalf("%d rows of the forgotten entity left in %s", cnt, table)
		}
	}
}

func openShardFile(t *testing.T, n *kumatest.Node, shard int) *sql.DB {
	t.Helper()
	path := filepath.Join(n.Cfg.DataDir, "default", fmt.Sprintf("shard-%03d.db", shard))
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// TestYesterdaysCopyCannotOpenForgottenEntity copies the shard files, then
// forgets one entity; a node started on the copies with the live keyvault
// cannot open that entity's events, and opens every other entity.
func TestYesterdaysCopyCannotOpenForgottenEntity(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ids := sameShard("cust", 3, n.Cfg.Shards)
	for _, id := range ids {
		if _, err := c.Append(t.Context(), id, markerEvents(3)); err != nil {
			t.Fatal(err)
		}
	}
	kumatest.StreamEvents(t, n.NC, "default", 9)
	n.Stop()
	// Yesterday's copy: the shard files and the JetStream store.
	backup := t.TempDir()
	kumatest.CopyDir(t, filepath.Join(n.Cfg.DataDir, "default"), filepath.Join(backup, "default"))
	kumatest.CopyDir(t, filepath.Join(n.Cfg.DataDir, "nats"), filepath.Join(backup, "nats"))

	n.Restart()
	c = n.Client(client.Options{})
	if _, err := c.Forget(t.Context(), ids[0], "test", "gdpr_test"); err != nil {
		t.Fatal(err)
	}
	n.Stop()
	// Yesterday's shard files beside today's (live) keyvault.
	kumatest.CopyDir(t, filepath.Join(n.Cfg.DataDir, "keyvault"), filepath.Join(backup, "keyvault"))
	if hits := filesContaining(t, backup, marker); len(hits) > 0 {
		t.Fatalf("the copy holds the marker in the clear: %v", hits)
	}
	old := kumatest.Start(t, func(cfg *app.Config) { cfg.DataDir = backup })
	oc := old.Client(client.Options{})
	for _, id := range ids[1:] {
		h, err := oc.History(t.Context(), id, 1, 10)
		if err != nil || len(h.Events) != 3 || !strings.Contains(string(h.Events[0].Data), marker) {
			t.Fatalf("%s from the copy = %+v, %v; other entities must open", id, h, err)
		}
	}
	// The copied stream: every other entity's messages open with its key
	// from the live keyvault; the forgotten one has no key any more.
	keys := vaultclient.New(old.NC, 0)
	streamed := kumatest.StreamEvents(t, old.NC, "default", 9)
	pseudonyms, err := keys.Pseudonyms(t.Context(), "default", ids)
	if err != nil {
		t.Fatal(err)
	}
	// The forgotten entity's events are there, under a pseudonym that
	// nothing leads from to its id any more.
	streamed[ids[0]] = streamed[pseudonyms[0]]
	for _, id := range ids {
		if len(streamed[id]) != 3 {
			t.Fatalf("the copied stream has %d events of %s, want 3", len(streamed[id]), id)
		}
		raw, err := keys.DataKey(t.Context(), "default", id, false)
		if id == ids[0] {
			if kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
				t.Fatalf("key of the forgotten entity: %v, want entity_forgotten", err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		key, _ := envelope.NewKey(raw.Key)
		for _, e := range streamed[id] {
			plain, err := key.Open(e.Payload, envelope.AAD(envelope.PurposeEvent, "default", id, e.Version))
			if err != nil || !strings.Contains(string(plain), marker) {
				t.Fatalf("%s v%d from the copied stream: %q, %v", id, e.Version, plain, err)
			}
		}
	}
	for _, op := range []func() error{
		func() error { _, err := oc.Read(t.Context(), ids[0]); return err },
		func() error { _, err := oc.History(t.Context(), ids[0], 1, 10); return err },
		func() error { _, err := oc.Export(t.Context(), ids[0]); return err },
	} {
		if err := op(); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
			t.Fatalf("the forgotten entity from the copy: %v, want entity_forgotten", err)
		}
	}
}

// TestSwappedCiphertextsDoNotOpen swaps sealed payloads between entities and
// between versions inside the shard file: every swapped event fails to open
// (internal, logged), never returning another's data.
func TestSwappedCiphertextsDoNotOpen(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ids := sameShard("swap", 3, n.Cfg.Shards)
	for _, id := range ids {
		if _, err := c.Append(t.Context(), id, markerEvents(2)); err != nil {
			t.Fatal(err)
		}
	}
	shard := placement.ShardOf(ids[0], n.Cfg.Shards)
	n.Stop()
	db := openShardFile(t, n, shard)
	swap := func(e1 string, v1 int64, e2 string, v2 int64) {
		t.Helper()
		p1 := append([]byte(nil), kumatest.EventPayload(t, db, e1, v1)...)
		p2 := append([]byte(nil), kumatest.EventPayload(t, db, e2, v2)...)
		kumatest.SetEventPayload(t, db, e1, v1, p2)
		kumatest.SetEventPayload(t, db, e2, v2, p1)
	}
	swap(ids[0], 1, ids[1], 1) // between entities
	swap(ids[2], 1, ids[2], 2) // between versions
	db.Close()

	n.Restart()
	c = n.Client(client.Options{})
	for _, id := range ids {
		_, err := c.History(t.Context(), id, 1, 10)
		var kerr *kuma.Error
		if !errors.As(err, &kerr) || kerr.Code != kuma.CodeInternal || strings.Contains(kerr.Message, marker) {
			t.Fatalf("history of %s with a swapped payload = %v, want internal with no data", id, err)
		}
	}
}

// TestForgetErasesOldShardSnapshots: the node uploads copies of its shards
// to the object store (here after a first forget marks the shard changed);
// once an entity on that shard is forgotten, the copy is replaced and the
// store's files hold its id no more: not in the live copy, not in the
// chunks of the copy it replaced.
func TestForgetErasesOldShardSnapshots(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ids := sameShard("snap-subject", 2, n.Cfg.Shards)
	first, victim := ids[0], ids[1]
	for _, id := range ids {
		if _, err := c.Append(t.Context(), id, markerEvents(3)); err != nil {
			t.Fatal(err)
		}
	}
	objDir := filepath.Join(n.Cfg.DataDir, "nats")
	inSnapshots := func(s string) []string {
		var hits []string
		for _, h := range filesContaining(t, objDir, s) {
			if strings.Contains(h, "OBJ_") {
				hits = append(hits, h)
			}
		}
		return hits
	}
	waitFor := func(what string, done func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !done() {
			if time.Now().After(deadline) {
				t.Fatalf("gave up waiting: %s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// A forget marks the shard changed: its copy, with the victim's rows,
	// is uploaded at the next tick.
	if _, err := c.Forget(t.Context(), first, "test", ""); err != nil {
		t.Fatal(err)
	}
	waitFor("an uploaded copy of the shard holding "+victim, func() bool { return len(inSnapshots(victim)) > 0 })

	if _, err := c.Forget(t.Context(), victim, "test", ""); err != nil {
		t.Fatal(err)
	}
	waitFor("the copies holding "+victim+" to leave the store's files", func() bool { return len(inSnapshots(victim)) == 0 })
	n.Stop()
	if hits := inSnapshots(victim); len(hits) > 0 {
		t.Fatalf("after stop, the snapshots hold %s in %v", victim, hits)
	}
	// Nor any other file but the event stream's own (its messages name the
	// entity; that is the stream format's business, not the copies').
	for _, h := range filesContaining(t, n.Cfg.DataDir, victim) {
		if !strings.Contains(h, string(filepath.Separator)+kuma.StreamName("default")+string(filepath.Separator)) {
			t.Errorf("after forget and stop, %s holds the forgotten id", h)
		}
	}
}
