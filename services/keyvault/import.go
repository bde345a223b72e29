package keyvault

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
)

// fileKeys is what a keyvault file holds, opened: what an import carries
// into the bucket.
type fileKeys struct {
	idKey    []byte
	keys     []fileKey
	shredded []fileShred
}

type fileKey struct {
	kctx, entity string
	hash, dek    []byte
	createdAt    int64
}

type fileShred struct {
	hash                []byte
	at, eventsDeleted   int64
	reason, requestedBy string
}

// readFileKeys reads the keys and forgotten ids of a keyvault file. It
// returns nil when there is nothing to import: no file, a file whose keys
// were imported already, or one that holds neither keys nor forgotten ids.
func readFileKeys(ctx context.Context, path string, kek *envelope.Key) (*fileKeys, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	db, err := openFile(ctx, path)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var moved []byte
	if err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, movedKey).Scan(&moved); err == nil {
		return nil, nil
	}
	var n int
	if err := db.QueryRowContext(ctx, `SELECT (SELECT count(*) FROM keys) + (SELECT count(*) FROM shredded)`).Scan(&n); err != nil {
		return nil, fmt.Errorf("keyvault: read %s: %w", path, err)
	}
	if n == 0 {
		return nil, nil
	}
	f := &fileKeys{}
	if f.idKey, err = loadMeta(ctx, db, path, kek); err != nil {
		return nil, err
	}
	rows, err := db.QueryContext(ctx, `SELECT context, entity, wrapped, created_at FROM keys`)
	if err != nil {
		return nil, fmt.Errorf("keyvault: read %s: %w", path, err)
	}
	defer rows.Close()
	for rows.Next() {
		var k fileKey
		var wrapped []byte
		if err := rows.Scan(&k.kctx, &k.entity, &wrapped, &k.createdAt); err != nil {
			return nil, err
		}
		if k.dek, err = kek.Open(wrapped, envelope.AAD(envelope.PurposeDataKey, k.kctx, k.entity, 0)); err != nil {
			return nil, fmt.Errorf("keyvault: a key of %s does not open under the master key; nothing was imported", path)
		}
		k.hash = idHash(f.idKey, k.kctx, k.entity)
		f.keys = append(f.keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	// The audit row of a shred carries its reason; it names the id by the
	// first 8 bytes of its hash, in hex.
	srows, err := db.QueryContext(ctx, `SELECT s.id_hash, s.forgotten_at, s.events_deleted,
		coalesce((SELECT reason FROM audit a WHERE a.id_hash = lower(hex(substr(s.id_hash, 1, 8))) ORDER BY a.id LIMIT 1), ''),
		coalesce((SELECT requested_by FROM audit a WHERE a.id_hash = lower(hex(substr(s.id_hash, 1, 8))) ORDER BY a.id LIMIT 1), '')
		FROM shredded s`)
	if err != nil {
		return nil, fmt.Errorf("keyvault: read %s: %w", path, err)
	}
	defer srows.Close()
	for srows.Next() {
		var sh fileShred
		if err := srows.Scan(&sh.hash, &sh.at, &sh.eventsDeleted, &sh.reason, &sh.requestedBy); err != nil {
			return nil, err
		}
		f.shredded = append(f.shredded, sh)
	}
	return f, srows.Err()
}

// importFile writes the file's forgotten ids as tombstones and its keys
// into the bucket, each only if absent, so an import cut short runs again
// from the start harmlessly. Then it erases the keys from the file
// (secure_delete) and marks it moved, so the file store refuses it and no
// later start imports it again.
func (s *jetStreamStore) importFile(ctx context.Context, path string, f *fileKeys) error {
	for _, sh := range f.shredded {
		b, _ := json.Marshal(tombstone{At: sh.at, EventsDeleted: sh.eventsDeleted, Reason: sh.reason, RequestedBy: sh.requestedBy})
		if err := s.create(ctx, tombSubj(sh.hash), b); err != nil && !wrongLastSeq(err) {
			return fmt.Errorf("keyvault: import %s: forgotten id %s: %w", path, hex.EncodeToString(sh.hash[:8]), err)
		}
	}
	imported := 0
	for _, k := range f.keys {
		dek, _, err := s.key(ctx, k.kctx, k.entity, k.hash, false)
		switch {
		case err == nil:
			if !bytes.Equal(dek, k.dek) {
				return fmt.Errorf("keyvault: import %s: entity %q of context %s has another key in the bucket %s already; nothing more was imported",
					path, k.entity, k.kctx, cluster.KeysBucket)
			}
			continue
		case errors.Is(err, kuma.ErrEntityForgotten):
			continue // forgotten in the cluster since: its key must not come back
		case !errors.Is(err, kuma.ErrNotFound):
			return fmt.Errorf("keyvault: import %s: %w", path, err)
		}
		plain, _ := json.Marshal(sealedKey{Entity: k.entity, Key: k.dek, CreatedAt: k.createdAt})
		err = s.create(ctx, keySubj(k.kctx, k.hash), s.kek.Seal(nil, plain, keyAAD(k.kctx, k.hash)))
		if wrongLastSeq(err) {
			// Written meanwhile, by an instance that created a new key
			// while this one's was still only in the file.
			return fmt.Errorf("keyvault: import %s: entity %q of context %s got a key in the bucket while importing; nothing more was imported",
				path, k.entity, k.kctx)
		}
		if err != nil {
			return fmt.Errorf("keyvault: import %s: %w", path, err)
		}
		imported++
	}
	db, err := openFile(ctx, path)
	if err != nil {
		return err
	}
	defer db.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `DELETE FROM keys`); err != nil {
		return fmt.Errorf("keyvault: clear %s after the import: %w", path, err)
	}
	moved := fmt.Sprintf("the JetStream bucket %s, at %s", cluster.KeysBucket, s.now().UTC().Format(time.RFC3339))
	if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)`, movedKey, []byte(moved)); err != nil {
		return fmt.Errorf("keyvault: mark %s imported: %w", path, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("keyvault: clear %s after the import: %w", path, err)
	}
	// No page image with a key may stay behind in the WAL.
	if _, err := db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return fmt.Errorf("keyvault: checkpoint %s after the import: %w", path, err)
	}
	s.log.Info("keyvault: imported a keyvault file into the cluster's bucket", "file", path, "bucket", cluster.KeysBucket,
		"keys", len(f.keys), "new_in_bucket", imported, "forgotten_ids", len(f.shredded))
	return nil
}
