package cluster_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/nats-io/nats.go/jetstream"
)

// A backup's objects live only between upload and download: GetBackup
// erases what it downloaded, EraseBackups what a backup cut short left,
// and neither leaves a byte of their chunks in the NATS store. The failover
// snapshots are another bucket, untouched.
func TestBackupObjectsAreErasedOnceDownloaded(t *testing.T) {
	srv, nc := kumatest.NATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	dir := srv.JetStreamConfig().StoreDir
	put := func(name, marker string) cluster.BackupObject {
		t.Helper()
		obj, err := cluster.PutBackup(ctx, js, name, snapshotFile(t, marker))
		if err != nil {
			t.Fatal(err)
		}
		return obj
	}
	kept := put("b1/default/shard-000.db", "BACKUP-KEPT-r5t2")
	put("b2/default/shard-000.db", "BACKUP-CUT-ONE-h3j7")
	put("b2/keyvault/keys.db", "BACKUP-CUT-TWO-w8p1")

	got := filepath.Join(t.TempDir(), "shard-000.db")
	if err := cluster.GetBackup(ctx, js, kept.Name, got); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(got)
	if err != nil || int64(len(b)) != kept.Bytes || !bytes.HasPrefix(b, []byte("BACKUP-KEPT-r5t2")) {
		t.Fatalf("downloaded %d bytes (%v), want the %d uploaded", len(b), err, kept.Bytes)
	}
	if st, _ := os.Stat(got); st.Mode().Perm() != 0o600 {
		t.Fatalf("downloaded file mode %v, want 0600", st.Mode().Perm())
	}
	waitGone(t, dir, "BACKUP-KEPT-r5t2")

	n, err := cluster.EraseBackups(ctx, js, "b2/")
	if err != nil || n != 2 {
		t.Fatalf("EraseBackups(b2/) = %d, %v; want 2", n, err)
	}
	waitGone(t, dir, "BACKUP-CUT-ONE-h3j7")
	waitGone(t, dir, "BACKUP-CUT-TWO-w8p1")
	if err := cluster.GetBackup(ctx, js, "b2/keyvault/keys.db", filepath.Join(t.TempDir(), "x")); err == nil {
		t.Fatal("an erased backup object was downloaded")
	}
}
