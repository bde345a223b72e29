package keyvault_test

import (
	"bytes"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Every store backs up into a keyvault file of the file store's layout:
// its keys and tombstones, under the same master key, the master key not in
// it. Tombstones exported later, applied at the restore, win over the keys
// the backup holds.
func TestConformanceBackupAndRestoreWithLaterTombstones(t *testing.T) {
	forEachBackend(t, func(t *testing.T, _ backend, st *storage, nc *nats.Conn) {
		if nc == nil {
			nc = startNATS(t) // the backup travels through the object store
		}
		ctx := t.Context()
		master := envelope.NewRandomKey()
		kv := st.start(t, master, nc)
		keys := newKeys(t, kv, 300) // enough for the copy to split pages
		shred := func(e string) {
			t.Helper()
			if _, err := kv.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: e, Reason: "test", EventsDeleted: 1}); err != nil {
				t.Fatal(err)
			}
		}
		shred("user_0")
		rep, err := kv.Backup(ctx, "b1")
		if err != nil {
			t.Fatalf("backup: %v", err)
		}
		if rep.MasterKeyFingerprint != keyvault.MasterKeyFingerprint(master) || rep.Object != keyvault.BackupObjectName("b1") {
			t.Fatalf("backup reply %+v", rep)
		}
		js, _ := jetstream.New(nc)
		path := filepath.Join(t.TempDir(), "keys.db")
		if err := cluster.GetBackup(ctx, js, rep.Object, path); err != nil {
			t.Fatal(err)
		}
		obs, _ := js.ObjectStore(ctx, cluster.BackupsBucket)
		if _, err := obs.GetInfo(ctx, rep.Object); !errors.Is(err, jetstream.ErrObjectNotFound) {
			t.Fatalf("the backup object after its download: %v, want erased", err)
		}
		if bytes.Contains(mustReadFile(t, path), master) {
			t.Fatal("the backup holds the master key")
		}

		shred("user_1") // after the backup
		var later []kuma.Tombstone
		for after := ""; ; {
			page, err := kv.Tombstones(ctx, kuma.TombstonesRequest{After: after, Limit: 1})
			if err != nil {
				t.Fatal(err)
			}
			later = append(later, page.Tombstones...)
			if page.Next == "" {
				break
			}
			after = page.Next
		}
		if len(later) != 2 {
			t.Fatalf("tombstones in pages of one: %d, want 2", len(later))
		}

		wrapped := wrappedKey(t, path, "user_1")
		if _, err := keyvault.RestoreFile(ctx, path, envelope.NewRandomKey(), later); err == nil {
			t.Fatal("the restore under another master key was not refused")
		}
		r, err := keyvault.RestoreFile(ctx, path, master, later)
		if err != nil {
			t.Fatal(err)
		}
		if r.Applied != 1 || r.Keys != 1 {
			t.Fatalf("tombstones applied %d, keys destroyed %d; want 1 and 1 (user_1's)", r.Applied, r.Keys)
		}
		for e, want := range map[string]bool{"user_0": true, "user_1": true, "user_2": false} {
			if _, got := r.Forgotten("default", e); got != want {
				t.Fatalf("Forgotten(%s) = %v, want %v", e, got, want)
			}
		}
		if bytes.Contains(mustReadFile(t, path), wrapped[len(wrapped)-32:]) {
			t.Fatal("the restored file still holds bytes of the wrapped key a later tombstone destroyed")
		}
		// The restored file is a keyvault of its own.
		restored := (&storage{store: keyvault.StoreFile, path: path}).start(t, master, nil)
		for _, e := range []string{"user_2", "user_3"} {
			got, err := restored.DataKey(ctx, "default", e, false)
			if err != nil || !bytes.Equal(got.Key, keys[e].Key) || got.Pseudonym != keys[e].Pseudonym {
				t.Fatalf("restored key of %s: %v, want the original", e, err)
			}
		}
		for _, e := range []string{"user_0", "user_1"} {
			if _, err := restored.DataKey(ctx, "default", e, true); !errors.Is(err, kuma.ErrEntityForgotten) {
				t.Fatalf("restored key of %s: %v, want entity_forgotten", e, err)
			}
		}
	})
}

func mustReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// wrappedKey reads an entity's wrapped key from a closed keyvault file.
func wrappedKey(t *testing.T, path, entity string) []byte {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var w []byte
	if err := db.QueryRow(`SELECT wrapped FROM keys WHERE context = 'default' AND entity = ?`, entity).Scan(&w); err != nil {
		t.Fatal(err)
	}
	return w
}
