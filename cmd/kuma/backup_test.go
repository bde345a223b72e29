package main

// Issue 22, item 3: kuma backup under a writer load, kuma restore into a
// new data dir, a node started on it. Every event acknowledged before the
// backup began reads back the same; an entity forgotten after the backup is
// forgotten again (restore --tombstones); the relay fills the new stream
// from the first position; every file passes SQLite's integrity check; a
// damaged backup and another master key are refused, leaving the data dir
// empty.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	kumasqlite "github.com/kumadb/kuma/pkg/sqlite"
)

// backupAck is one acknowledged append of the load.
type backupAck struct {
	entity  string
	version int64
	data    string
	at      time.Time // when the acknowledgement came
}

func TestBackupUnderLoadRestoreAndForgetAgain(t *testing.T) {
	key := envelope.NewRandomKey()
	src := kumatest.Start(t, func(c *app.Config) { c.MasterKey = key })
	env := map[string]string{"KUMA_NATS_URL": src.App.ClientURL()}
	c := src.Client(client.Options{Timeout: 10 * time.Second})
	ctx := t.Context()

	// Forgotten before the backup: the backup's own tombstone keeps it so.
	for _, id := range []string{"gone-before", "gone-after"} {
		if _, err := c.Append(ctx, id, []kuma.EventInput{{Type: "Noted", Data: json.RawMessage(`{"secret":"x"}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Forget(ctx, "gone-before", "test", "test"); err != nil {
		t.Fatal(err)
	}

	// The load: a few writers, each over a few entities of its own.
	const writers = 4
	var (
		mu   sync.Mutex
		acks []backupAck
		wg   sync.WaitGroup
	)
	stop := make(chan struct{})
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("w%d-e%d", w, k%5)
				data := fmt.Sprintf(`{"w":%d,"k":%d}`, w, k)
				rep, err := c.Append(ctx, id, []kuma.EventInput{{Type: "Loaded", Data: json.RawMessage(data)}})
				if err != nil {
					t.Errorf("append to %s: %v", id, err)
					return
				}
				mu.Lock()
				acks = append(acks, backupAck{id, rep.LastVersion, data, time.Now()})
				mu.Unlock()
			}
		}()
	}
	time.Sleep(time.Second)
	dir := filepath.Join(t.TempDir(), "backup")
	began := time.Now()
	decl := filepath.Join(t.TempDir(), "projections.yaml")
	if err := os.WriteFile(decl, []byte("# the declarations the nodes run with\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errs, code := runCLI(t, env, "backup", dir, "--projections", decl)
	if code != 0 {
		close(stop)
		wg.Wait()
		t.Fatalf("kuma backup exit %d: %s%s", code, out, errs)
	}
	time.Sleep(300 * time.Millisecond) // the load goes on past the backup
	close(stop)
	wg.Wait()
	var m backupManifest
	if b, err := os.ReadFile(filepath.Join(dir, manifestName)); err != nil || json.Unmarshal(b, &m) != nil {
		t.Fatalf("manifest: %v %s", err, b)
	}
	if m.Shards != 4 || len(m.Files) != 6 || m.MasterKeyFingerprint == "" || m.Context != kuma.DefaultContext {
		t.Fatalf("manifest %+v: want 4 shard files, the projections and the keyvault of %q", m, kuma.DefaultContext)
	}
	if bytes.Contains(mustRead(t, filepath.Join(dir, keyvaultFile)), key) {
		t.Fatal("the keyvault copy holds the master key")
	}

	// Forgotten after the backup: only the tombstones export knows.
	if _, err := c.Forget(ctx, "gone-after", "test", "test"); err != nil {
		t.Fatal(err)
	}
	tombOut, errs, code := runCLI(t, env, "keyvault", "tombstones")
	if code != 0 || strings.Count(tombOut, "\n") != 2 {
		t.Fatalf("kuma keyvault tombstones exit %d printed %q %s, want two lines", code, tombOut, errs)
	}
	tombs := filepath.Join(t.TempDir(), "tombstones.jsonl")
	if err := os.WriteFile(tombs, []byte(tombOut), 0o600); err != nil {
		t.Fatal(err)
	}
	src.Stop()

	keyFile := filepath.Join(t.TempDir(), "master.key")
	writeKey(t, keyFile, key)
	otherKey := filepath.Join(t.TempDir(), "other.key")
	writeKey(t, otherKey, envelope.NewRandomKey())
	data := filepath.Join(t.TempDir(), "restored")

	// Another master key: refused before anything is written.
	_, errs, code = runCLI(t, nil, "restore", "--from", dir, "--data", data, "--master-key-file", otherKey)
	if code != 1 || !strings.Contains(errs, "another master key") {
		t.Fatalf("restore under another master key: exit %d %s, want exit 1 naming the master key", code, errs)
	}
	t.Logf("another master key: %s", strings.TrimSpace(errs))
	requireEmpty(t, data)

	// A flipped byte: refused naming the file.
	damaged := filepath.Join(t.TempDir(), "damaged")
	kumatest.CopyDir(t, dir, damaged)
	victim := filepath.Join(damaged, shardFile(kuma.DefaultContext, 1))
	b := mustRead(t, victim)
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(victim, b, 0o600); err != nil {
		t.Fatal(err)
	}
	_, errs, code = runCLI(t, nil, "restore", "--from", damaged, "--data", data, "--master-key-file", keyFile)
	if code != 1 || !strings.Contains(errs, "default/shard-001.db is damaged") {
		t.Fatalf("restore of a damaged backup: exit %d %s, want exit 1 naming default/shard-001.db", code, errs)
	}
	t.Logf("a flipped byte: %s", strings.TrimSpace(errs))
	requireEmpty(t, data)

	// A damaged page that the manifest agrees with (a backup damaged
	// before its checksums were taken): SQLite's integrity check refuses
	// it after the copy, and the data dir is emptied again.
	b[len(b)/2] ^= 0x40
	b[4096] = 0xff // page 2's b-tree page type
	if err := os.WriteFile(victim, b, 0o600); err != nil {
		t.Fatal(err)
	}
	var dm backupManifest
	if err := json.Unmarshal(mustRead(t, filepath.Join(damaged, manifestName)), &dm); err != nil {
		t.Fatal(err)
	}
	for i, f := range dm.Files {
		if filepath.FromSlash(f.Path) == shardFile(kuma.DefaultContext, 1) {
			dm.Files[i].SHA256, dm.Files[i].Bytes, _ = fileSHA256(victim)
		}
	}
	mb, _ := json.Marshal(dm)
	if err := os.WriteFile(filepath.Join(damaged, manifestName), mb, 0o600); err != nil {
		t.Fatal(err)
	}
	_, errs, code = runCLI(t, nil, "restore", "--from", damaged, "--data", data, "--master-key-file", keyFile)
	if code != 1 || !strings.Contains(errs, "backup file default/shard-001.db: sqlite: integrity check") || !strings.Contains(errs, "left empty") {
		t.Fatalf("restore of a file that fails the integrity check: exit %d %s, want exit 1 naming shard-001.db", code, errs)
	}
	t.Logf("a page damaged under a matching checksum: %s", strings.TrimSpace(errs))
	requireEmpty(t, data)

	out, errs, code = runCLI(t, map[string]string{"KUMA_MASTER_KEY": encodeKey(key)},
		"restore", "--from", dir, "--data", data, "--tombstones", tombs)
	if code != 0 {
		t.Fatalf("restore exit %d: %s%s", code, out, errs)
	}
	for _, f := range append(shardFiles(data), filepath.Join(data, keyvaultFile)) {
		if err := kumasqlite.CheckIntegrity(ctx, f); err != nil {
			t.Fatalf("restored file: %v", err)
		}
	}

	dst := kumatest.Start(t, func(c *app.Config) { c.MasterKey = key; c.DataDir = data })
	rc := dst.Client(client.Options{Timeout: 10 * time.Second})

	// Every event acknowledged before the backup began is there, the same.
	want := map[string][]backupAck{}
	checked := 0
	for _, a := range acks {
		if a.at.Before(began) {
			want[a.entity] = append(want[a.entity], a)
		}
	}
	for id, as := range want {
		h, err := rc.History(ctx, id, 1, 1000)
		if err != nil {
			t.Fatalf("history of %s after restore: %v", id, err)
		}
		got := map[int64]string{}
		for _, e := range h.Events {
			got[e.Version] = compact(e.Data)
		}
		for _, a := range as {
			if got[a.version] != a.data {
				t.Fatalf("%s version %d after restore: %q, want %q (acknowledged %s before the backup began)",
					id, a.version, got[a.version], a.data, began.Sub(a.at))
			}
			checked++
		}
	}
	if checked == 0 {
		t.Fatal("no event was acknowledged before the backup began")
	}
	// The tombstones win: forgotten before the backup, and after it.
	for _, id := range []string{"gone-before", "gone-after"} {
		if _, err := rc.Read(ctx, id); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
			t.Fatalf("read of %s after restore: %v, want entity_forgotten", id, err)
		}
	}
	// The relay fills the new, empty stream from the first position: every
	// shard's stream reaches the file's last position.
	last := map[int]int64{}
	for _, f := range m.Files {
		if f.Shard != nil {
			last[*f.Shard] = f.LastSeq
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := rc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		behind := ""
		for _, s := range st.Shards {
			p, _ := kuma.ParsePosition(s.Published)
			if p.Seq < last[s.Shard] {
				behind += fmt.Sprintf(" shard %d published %d of %d;", s.Shard, p.Seq, last[s.Shard])
			}
		}
		if behind == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stream was not refilled:%s", behind)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%d acknowledged events before the backup point checked over %d entities; %d acknowledged in all", checked, len(want), len(acks))

	// The forgotten entity's rows are gone from the files, not only sealed.
	dst.Stop()
	for _, f := range shardFiles(data) {
		if err := kumasqlite.CheckIntegrity(ctx, f); err != nil {
			t.Fatalf("after serving: %v", err)
		}
		if bytes.Contains(mustRead(t, f), []byte("gone-after")) {
			t.Fatalf("%s still holds the id of the entity forgotten after the backup (restore said: %s)", f, errs)
		}
	}
}

// TestRestoreRefusesUsage covers the refusals that need no node: a
// non-empty data dir, a directory that is no backup, no master key.
func TestRestoreRefusesUsage(t *testing.T) {
	notBackup := t.TempDir()
	full := t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "x"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "k")
	writeKey(t, keyFile, envelope.NewRandomKey())
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"restore", "--from", notBackup, "--data", t.TempDir()}, 2, "master key"},
		{[]string{"restore", "--from", notBackup, "--data", t.TempDir(), "--master-key-file", keyFile}, 1, "manifest.json"},
		{[]string{"restore", "--data", t.TempDir()}, 2, "--from"},
		{[]string{"backup"}, 2, "kuma backup DIR"},
		{[]string{"backup", full}, 2, "not empty"},
		{[]string{"backup", t.TempDir(), "--projections", filepath.Join(notBackup, "none.yaml")}, 2, "--projections"},
	} {
		_, errs, code := runCLI(t, nil, tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d %q, want exit %d mentioning %q", tc.args, code, errs, tc.code, tc.want)
		}
	}
}

func writeKey(t *testing.T, path string, key []byte) {
	t.Helper()
	if err := os.WriteFile(path, []byte(encodeKey(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func requireEmpty(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if len(entries) > 0 {
		t.Fatalf("%s holds %d entries after a refused restore, want none", dir, len(entries))
	}
}

func shardFiles(data string) []string {
	var out []string
	for n := range 4 {
		out = append(out, filepath.Join(data, shardFile(kuma.DefaultContext, n)))
	}
	return out
}

func encodeKey(key []byte) string { return base64.StdEncoding.EncodeToString(key) }
