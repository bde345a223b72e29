package keyvault

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"fmt"
	"os"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go/jetstream"
)

// MasterKeyFingerprint names a master key without revealing it: an HMAC
// under the key of a fixed label, so it can be computed only by whoever
// holds the key, and tells nothing of it. A backup records it; restore
// compares it with the key it is given before writing anything.
func MasterKeyFingerprint(masterKey []byte) string {
	m := hmac.New(sha256.New, masterKey)
	m.Write([]byte("kuma master-key fingerprint v1"))
	return hex.EncodeToString(m.Sum(nil)[:16])
}

// BackupObjectName is the object a backup's keyvault copy is uploaded
// under.
func BackupObjectName(id string) string { return id + "/keyvault/keys.db" }

// errBucketBackup answers a backup or tombstones request on the JetStream
// store: exporting the bucket into a file is not built.
func errBucketBackup() error {
	return kuma.Errorf(kuma.CodeNotFound, "there is no keyvault file to back up: this keyvault keeps its keys in the JetStream bucket %s; "+
		"kuma backup copies only a file keyvault (a single `kuma up`) so far: back the bucket up with `nats stream backup KV_%s`",
		cluster.KeysBucket, cluster.KeysBucket)
}

// Backup uploads a consistent copy of the keyvault file (its wrapped keys,
// tombstones, audit and sealed id key: everything but the master key, which
// never leaves the process) to the backup object store, for `kuma backup`.
// The copy is made by VACUUM INTO on a connection of its own, one read
// snapshot, while the store goes on; it holds no page of a deleted key.
func (s *Service) Backup(ctx context.Context, id string) (*kuma.BackupReply, error) {
	if !kuma.ValidBackupID(id) {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "backup id %q: want 1 to 64 letters, digits, '-' or '_'", id)
	}
	st, _, err := s.current()
	if err != nil {
		return nil, err
	}
	fs, ok := st.(*sqliteStore)
	if !ok {
		return nil, errBucketBackup()
	}
	if s.nc == nil {
		return nil, kuma.Errorf(kuma.CodeUnavailable, "keyvault: a backup needs a NATS connection")
	}
	tmp := fs.path + ".backup-" + id
	_ = os.Remove(tmp)
	defer os.Remove(tmp)
	if err := vacuumInto(ctx, fs.path, tmp); err != nil {
		return nil, err
	}
	js, err := jetstream.New(s.nc)
	if err != nil {
		return nil, err
	}
	obj, err := cluster.PutBackup(ctx, js, BackupObjectName(id), tmp)
	if err != nil {
		return nil, err
	}
	return &kuma.BackupReply{Object: obj.Name, Bytes: obj.Bytes, SHA256: obj.SHA256,
		MasterKeyFingerprint: MasterKeyFingerprint(s.cfg.MasterKey)}, nil
}

// vacuumInto writes a consistent copy of the SQLite file src to dst, which
// is created private first (VACUUM INTO would create it 0644).
func vacuumInto(ctx context.Context, src, dst string) error {
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, sqlite.PrivateFileMode)
	if err != nil {
		return fmt.Errorf("keyvault: backup: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("keyvault: backup: %w", err)
	}
	db, err := sql.Open("sqlite", sqlite.DSN(src, "busy_timeout(10000)"))
	if err != nil {
		return fmt.Errorf("keyvault: backup: %w", err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `VACUUM INTO ?`, dst); err != nil {
		return fmt.Errorf("keyvault: backup of %s: %w", src, err)
	}
	return nil
}

// Tombstones returns a page of the forgotten ids, by pseudonym, in order:
// what `kuma keyvault tombstones` exports so that a restore of an older
// backup forgets again what was forgotten since.
func (s *Service) Tombstones(ctx context.Context, r kuma.TombstonesRequest) (*kuma.TombstonesReply, error) {
	if r.Limit < 1 || r.Limit > kuma.MaxTombstonesPage {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "limit must be 1 to %d", kuma.MaxTombstonesPage)
	}
	var after []byte
	if r.After != "" {
		h, err := parsePseudonym(r.After)
		if err != nil {
			return nil, err
		}
		after = h
	}
	st, _, err := s.current()
	if err != nil {
		return nil, err
	}
	fs, ok := st.(*sqliteStore)
	if !ok {
		return nil, errBucketBackup()
	}
	db, err := sql.Open("sqlite", sqlite.DSN(fs.path, "busy_timeout(10000)", "query_only(1)"))
	if err != nil {
		return nil, fmt.Errorf("keyvault: tombstones: %w", err)
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, `SELECT id_hash, forgotten_at, events_deleted FROM shredded
		WHERE id_hash > coalesce(?, x'') ORDER BY id_hash LIMIT ?`, after, r.Limit+1)
	if err != nil {
		return nil, fmt.Errorf("keyvault: tombstones: %w", err)
	}
	defer rows.Close()
	out := &kuma.TombstonesReply{Tombstones: []kuma.Tombstone{}}
	for rows.Next() {
		var h []byte
		var t kuma.Tombstone
		if err := rows.Scan(&h, &t.ForgottenAt, &t.EventsDeleted); err != nil {
			return nil, err
		}
		if len(out.Tombstones) == r.Limit {
			out.Next = out.Tombstones[r.Limit-1].Pseudonym
			break
		}
		t.Pseudonym = encodePseudonym(h)
		out.Tombstones = append(out.Tombstones, t)
	}
	return out, rows.Err()
}
