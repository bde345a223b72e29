package keyvault_test

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// --- durability and the master key ----------------------------------------

func TestKeysSurviveRestart(t *testing.T) {
	path, master := dbPath(t), envelope.NewRandomKey()
	kv := startVault(t, path, master, nil)
	want := map[string][]byte{}
	for i := range 20 {
		e := fmt.Sprintf("user_%d", i)
		want[e] = mustKey(t, kv, "default", e, true)
	}
	rec, err := kv.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "user_0", EventsDeleted: 4, At: fixedNow})
	if err != nil {
		t.Fatal(err)
	}
	delete(want, "user_0")
	stopVault(t, kv)

	kv2 := startVault(t, path, master, nil)
	for e, k := range want {
		if got := mustKey(t, kv2, "default", e, false); !bytes.Equal(got, k) {
			t.Errorf("%s after restart: got %x, want %x", e, got, k)
		}
	}
	_, err = kv2.DataKey(t.Context(), "default", "user_0", true)
	wantCode(t, "DataKey of a shredded entity after restart", err, kuma.ErrEntityForgotten)
	got, err := kv2.Forgotten(t.Context(), "default", "user_0")
	if err != nil || got == nil {
		t.Fatalf("Forgotten after restart: got %+v, %v; want the record", got, err)
	}
	if got.Entity != rec.Entity || !got.ForgottenAt.Equal(rec.ForgottenAt) || got.EventsDeleted != rec.EventsDeleted {
		t.Errorf("Forgotten after restart: got %+v, want %+v", got, rec)
	}
}

func TestWrongMasterKeyIsRefused(t *testing.T) {
	path, master := dbPath(t), envelope.NewRandomKey()
	kv := startVault(t, path, master, nil)
	k := mustKey(t, kv, "default", "user_1", true)
	stopVault(t, kv)

	wrong := newVault(t, path, envelope.NewRandomKey(), nil, nil)
	err := wrong.Start(t.Context())
	if err == nil {
		_ = wrong.Stop(context.Background())
		t.Fatal("Start with another master key: got nil, want an error")
	}
	if !strings.Contains(err.Error(), "master key") {
		t.Errorf("Start with another master key: got %q, want it to mention the master key", err)
	}
	_ = wrong.Stop(context.Background())

	// The refused start changed nothing: the right key still opens it.
	kv2 := startVault(t, path, master, nil)
	if got := mustKey(t, kv2, "default", "user_1", false); !bytes.Equal(got, k) {
		t.Errorf("after a refused start: got %x, want %x", got, k)
	}
}

// --- nothing in the clear ----------------------------------------------------

func TestFileHoldsNoDataKeyInTheClear(t *testing.T) {
	path := dbPath(t)
	kv := startVault(t, path, envelope.NewRandomKey(), nil)
	var keys [][]byte
	for i := range 100 {
		keys = append(keys, mustKey(t, kv, "default", fmt.Sprintf("user_%d", i), true))
	}
	check := func(when string) {
		raw := rawFiles(t, path)
		// Sanity: the reader sees the file's content (ids are stored as is).
		if !bytes.Contains(raw, []byte("user_42")) {
			t.Fatalf("%s: the raw file does not contain the entity id user_42; is this the right file?", when)
		}
		for i, k := range keys {
			if bytes.Contains(raw, k) {
				t.Errorf("%s: the raw file holds the data key of user_%d in the clear", when, i)
			}
			// Not even half of it.
			if bytes.Contains(raw, k[:16]) || bytes.Contains(raw, k[16:]) {
				t.Errorf("%s: the raw file holds half of the data key of user_%d", when, i)
			}
		}
	}
	check("while running")
	stopVault(t, kv)
	check("after stop")
}

func TestForgottenIDIsNotStoredInTheClear(t *testing.T) {
	const marker = "marker-entity-4242"
	path := dbPath(t)
	var logs bytes.Buffer
	kv := newVault(t, path, envelope.NewRandomKey(), nil, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err := kv.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kv.Stop(context.Background()) })
	for i := range 50 {
		mustKey(t, kv, "default", fmt.Sprintf("other_%d", i), true)
	}
	mustKey(t, kv, "default", marker, true)
	if raw := rawFiles(t, path); !bytes.Contains(raw, []byte(marker)) {
		t.Fatalf("before the shred: the raw file does not contain %q; the check below would prove nothing", marker)
	}
	_, err := kv.Shred(t.Context(), vaultclient.ShredRequest{
		Context: "default", Entity: marker, Reason: "user asked", RequestedBy: "support-7", EventsDeleted: 12, At: fixedNow,
	})
	if err != nil {
		t.Fatal(err)
	}
	if raw := rawFiles(t, path); bytes.Contains(raw, []byte(marker)) {
		t.Errorf("after the shred, while running: the raw file still contains %q", marker)
	}
	stopVault(t, kv)
	if raw := rawFiles(t, path); bytes.Contains(raw, []byte(marker)) {
		t.Errorf("after the shred and stop: the raw file still contains %q", marker)
	}
	if strings.Contains(logs.String(), marker) {
		t.Errorf("the logs name the forgotten id %q:\n%s", marker, logs.String())
	}
	if !strings.Contains(logs.String(), "audit: entity forgotten") {
		t.Errorf("the logs have no audit line for the shred:\n%s", logs.String())
	}

	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT time, context, id_hash, reason, requested_by, events_deleted FROM audit`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		n++
		var (
			at                          int64
			kctx, idHash, reason, reqBy string
			eventsDeleted               int64
		)
		if err := rows.Scan(&at, &kctx, &idHash, &reason, &reqBy, &eventsDeleted); err != nil {
			t.Fatal(err)
		}
		if reason != "user asked" || reqBy != "support-7" || eventsDeleted != 12 || kctx != "default" {
			t.Errorf("audit row: got reason %q, requested_by %q, events_deleted %d, context %q; want %q, %q, 12, %q",
				reason, reqBy, eventsDeleted, kctx, "user asked", "support-7", "default")
		}
		if want := fixedNow.UTC().Truncate(time.Microsecond).UnixNano(); at != want {
			t.Errorf("audit row: got time %d, want %d", at, want)
		}
		if idHash == "" || strings.Contains(idHash, marker) || strings.Contains(marker, idHash) {
			t.Errorf("audit row: got id_hash %q, want a hash that is not the id %q", idHash, marker)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("audit rows: got %d, want 1", n)
	}
	var keyRows int
	if err := db.QueryRow(`SELECT count(*) FROM keys WHERE entity = ?`, marker).Scan(&keyRows); err != nil {
		t.Fatal(err)
	}
	if keyRows != 0 {
		t.Errorf("keys rows of the shredded entity: got %d, want 0", keyRows)
	}
	var hash []byte
	if err := db.QueryRow(`SELECT id_hash FROM shredded`).Scan(&hash); err != nil {
		t.Fatal(err)
	}
	if len(hash) != 32 || bytes.Contains(hash, []byte(marker)) {
		t.Errorf("shredded.id_hash: got %x (%d bytes), want a 32-byte keyed hash", hash, len(hash))
	}
}

// TestPathWithURICharacters: the keyvault must open the file it was given.
// Start builds the DSN as "file:"+Path+"?"+pragmas without escaping, so a
// '#' or '?' in Path cuts the file name short (a directory "a#b" makes it
// write the file "a" next to it) and a '%' is percent-decoded (Start fails).
func TestPathWithURICharacters(t *testing.T) {
	for i, dir := range []string{"hash#x", "query?x", "pct%41"} {
		// Subtests are named by index: t.TempDir's name would carry the '#'.
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), dir, "keys.db")
			kv := startVault(t, path, envelope.NewRandomKey(), nil)
			mustKey(t, kv, "default", "user_1", true)
			stopVault(t, kv)
			if _, err := os.Stat(path); err != nil {
				t.Errorf("after Start on %q: got %v, want the file to exist", path, err)
			}
		})
	}
}

// TestRestartSameService: Stop then Start on the same Service must work
// like a fresh one. Stop sets closed=true and Start never clears it, so the
// second Stop neither closes the new ops channel nor waits for its goroutine,
// then closes the file; the next call reaches the old goroutine, which uses
// the nil *sql.DB and panics, killing the process. The crash runs in a child
// process so that it fails this test only.
func TestRestartSameService(t *testing.T) {
	if os.Getenv("KEYVAULT_TEST_CHILD") == "restart" {
		kv := newVault(t, dbPath(t), envelope.NewRandomKey(), nil, nil)
		ctx := t.Context()
		if err := kv.Start(ctx); err != nil {
			t.Fatal(err)
		}
		k := mustKey(t, kv, "default", "user_1", true)
		stopVault(t, kv)
		if err := kv.Start(ctx); err != nil {
			t.Fatalf("second Start: %v", err)
		}
		if got := mustKey(t, kv, "default", "user_1", false); !bytes.Equal(got, k) {
			t.Fatalf("after restart: got %x, want %x", got, k)
		}
		stopVault(t, kv)
		func() {
			defer func() { _ = recover() }() // a panic in the caller is the other known bug
			_, _ = kv.DataKey(ctx, "default", "user_1", false)
		}()
		return
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestRestartSameService$", "-test.count=1")
	cmd.Env = append(os.Environ(), "KEYVAULT_TEST_CHILD=restart")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("restarted Service: child process got %v, want a clean exit; output:\n%s", err, out)
	}
}
