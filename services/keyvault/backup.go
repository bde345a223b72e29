package keyvault

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
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

// Backup uploads a copy of the keyvault as a keyvault file (its wrapped
// keys, tombstones, audit and sealed id key: everything but the master key,
// which never leaves the process) to the backup object store, for `kuma
// backup`. A file store is copied by VACUUM INTO on a connection of its own,
// one read snapshot, while the store goes on; it holds no page of a deleted
// key. A bucket is exported into a new file of the same layout (exportFile).
func (s *Service) Backup(ctx context.Context, id string) (*kuma.BackupReply, error) {
	if !kuma.ValidBackupID(id) {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "backup id %q: want 1 to 64 letters, digits, '-' or '_'", id)
	}
	st, idKey, err := s.current()
	if err != nil {
		return nil, err
	}
	if s.nc == nil {
		return nil, kuma.Errorf(kuma.CodeUnavailable, "keyvault: a backup needs a NATS connection")
	}
	// The copy is made beside the keyvault's file, in its private folder
	// (a bucket store without a file: the system's temporary folder).
	parent := ""
	if s.cfg.Path != "" {
		parent = filepath.Dir(s.cfg.Path)
		if err := sqlite.PrepareDir(parent); err != nil {
			return nil, fmt.Errorf("keyvault: backup: %w", err)
		}
	}
	dir, err := os.MkdirTemp(parent, "backup-")
	if err != nil {
		return nil, fmt.Errorf("keyvault: backup: %w", err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "keys.db")
	switch st := st.(type) {
	case *sqliteStore:
		err = sqlite.CopyInto(ctx, st.path, tmp)
	case *jetStreamStore:
		err = st.exportFile(ctx, tmp, idKey)
	default:
		err = kuma.Errorf(kuma.CodeInternal, "keyvault: no backup for this store")
	}
	if err != nil {
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
	if js, ok := st.(*jetStreamStore); ok {
		return js.tombstonesPage(ctx, after, r.Limit)
	}
	fs, ok := st.(*sqliteStore)
	if !ok {
		return nil, kuma.Errorf(kuma.CodeInternal, "keyvault: no tombstones for this store")
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

// scan calls fn with the newest message of every subject matching filter
// under the bucket's prefix, in stream order, walking the stream by
// "next message of the subject from sequence" gets, which the keyvault's
// NATS user may make already (kuma.conf): one request per message, no
// consumer.
func (s *jetStreamStore) scan(ctx context.Context, filter string, fn func(subj string, data []byte) error) error {
	for seq := uint64(1); ; {
		m, err := retried(ctx, func(ctx context.Context) (*jetstream.RawStreamMsg, error) {
			return s.st.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(keysPrefix+filter))
		})
		if msgNotFound(err) {
			return nil
		}
		if err != nil {
			return s.internal("scan the key bucket", err)
		}
		if err := fn(strings.TrimPrefix(m.Subject, keysPrefix), m.Data); err != nil {
			return err
		}
		seq = m.Sequence + 1
	}
}

// bucketTombstones reads every tombstone of the bucket, by id hash.
func (s *jetStreamStore) bucketTombstones(ctx context.Context) (map[string]tombstone, error) {
	out := map[string]tombstone{}
	err := s.scan(ctx, "f.>", func(subj string, data []byte) error {
		h, err := parsePseudonym(strings.TrimPrefix(subj, "f."))
		if err != nil {
			return nil // not a tombstone of this store's making
		}
		var t tombstone
		if err := json.Unmarshal(data, &t); err != nil {
			return s.internal("read tombstone", err)
		}
		out[string(h)] = t
		return nil
	})
	return out, err
}

// exportFile writes the bucket's keys and tombstones into a new keyvault
// file at dst, in the file store's layout and under the same master key:
// what a single node's keyvault opens, and what a clustered node imports
// into its bucket at start (import.go). A key whose id has a tombstone is
// left out: the shred erasing it was under way during the scan.
func (s *jetStreamStore) exportFile(ctx context.Context, dst string, idKey []byte) error {
	type key struct {
		kctx, entity string
		hash, dek    []byte
		createdAt    int64
	}
	keys := map[string]key{}
	err := s.scan(ctx, "k.>", func(subj string, data []byte) error {
		parts := strings.Split(subj, ".")
		if len(parts) != 3 {
			return nil
		}
		h, err := parsePseudonym(parts[2])
		if err != nil {
			return nil
		}
		plain, err := s.kek.Open(data, keyAAD(parts[1], h))
		var k sealedKey
		if err == nil {
			err = json.Unmarshal(plain, &k)
		}
		if err != nil {
			s.log.Error("wrapped key does not open", "context", parts[1], "id_hash", hexHash(h), "err", err)
			return kuma.Errorf(kuma.CodeInternal, "a key of the bucket does not open under the master key")
		}
		keys[string(h)] = key{parts[1], k.Entity, h, k.Key, k.CreatedAt}
		return nil
	})
	if err != nil {
		return err
	}
	tombs, err := s.bucketTombstones(ctx)
	if err != nil {
		return err
	}
	db, err := openFile(ctx, dst)
	if err != nil {
		return err
	}
	defer db.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := writeMeta(ctx, tx, s.kek, idKey); err != nil {
		return err
	}
	for h, k := range keys {
		if _, gone := tombs[h]; gone {
			continue
		}
		wrapped := s.kek.Seal(nil, k.dek, envelope.AAD(envelope.PurposeDataKey, k.kctx, k.entity, 0))
		if _, err := tx.ExecContext(ctx, `INSERT INTO keys (context, entity, wrapped, created_at, id_hash) VALUES (?, ?, ?, ?, ?)`,
			k.kctx, k.entity, wrapped, k.createdAt, k.hash); err != nil {
			return err
		}
	}
	for h, t := range tombs {
		if _, err := tx.ExecContext(ctx, `INSERT INTO shredded (id_hash, forgotten_at, events_deleted) VALUES (?, ?, ?)`,
			[]byte(h), t.At, t.EventsDeleted); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO audit (time, context, id_hash, reason, requested_by, events_deleted) VALUES (?, '', ?, ?, ?, ?)`,
			t.At, hexHash([]byte(h)), t.Reason, t.RequestedBy, t.EventsDeleted); err != nil {
			return err
		}
	}
	if _, err := tx.ExecContext(ctx, `CREATE UNIQUE INDEX IF NOT EXISTS keys_id_hash ON keys (id_hash)`); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	// One file, no WAL beside it: the upload reads dst alone.
	_, err = db.ExecContext(ctx, `PRAGMA journal_mode=DELETE`)
	return err
}

// tombstonesPage is Tombstones for the bucket: every tombstone is read and
// sorted by id hash for each page, which is linear in the forgotten ids.
func (s *jetStreamStore) tombstonesPage(ctx context.Context, after []byte, limit int) (*kuma.TombstonesReply, error) {
	all, err := s.bucketTombstones(ctx)
	if err != nil {
		return nil, err
	}
	hashes := make([]string, 0, len(all))
	for h := range all {
		if h > string(after) {
			hashes = append(hashes, h)
		}
	}
	sort.Strings(hashes)
	out := &kuma.TombstonesReply{Tombstones: []kuma.Tombstone{}}
	for i, h := range hashes {
		if i == limit {
			out.Next = out.Tombstones[limit-1].Pseudonym
			break
		}
		t := all[h]
		out.Tombstones = append(out.Tombstones, kuma.Tombstone{Pseudonym: encodePseudonym([]byte(h)), ForgottenAt: t.At, EventsDeleted: t.EventsDeleted})
	}
	return out, nil
}
