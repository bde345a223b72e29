package keyvault

import (
	"context"
	"fmt"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
)

// Restored is a keyvault file restored from a backup, with the ids it
// holds as forgotten: what `kuma restore` needs to forget them again in
// the shard files.
type Restored struct {
	idKey    []byte
	shredded map[string]int64 // id hash → forgotten at (unix nanoseconds)
	// Applied counts the later tombstones that were new to the file; Keys
	// counts the data keys they destroyed.
	Applied, Keys int
}

// Forgotten reports whether the entity kctx/entity is forgotten in the
// restored keyvault, and when. Safe for concurrent use.
func (r *Restored) Forgotten(kctx, entity string) (time.Time, bool) {
	at, ok := r.shredded[string(idHash(r.idKey, kctx, entity))]
	return time.Unix(0, at).UTC(), ok
}

// RestoreFile readies the keyvault file at path, copied from a backup (not
// in use): it proves masterKey on it (a file made under another master key
// is refused), then applies later, tombstones exported from the live
// keyvault after the backup: each destroys the key of its id, if the file
// has it (secure_delete, then the WAL is truncated), and is recorded as
// forgotten, with an audit row, so the restored keyvault answers
// entity_forgotten for it as the live one did. The tombstones win: a key
// the backup holds for an id forgotten since is gone once RestoreFile
// returns.
func RestoreFile(ctx context.Context, path string, masterKey []byte, later []kuma.Tombstone) (*Restored, error) {
	kek, err := envelope.NewKey(masterKey)
	if err != nil {
		return nil, err
	}
	db, err := openFile(ctx, path)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	r := &Restored{shredded: map[string]int64{}}
	if r.idKey, err = loadMeta(ctx, db, path, kek); err != nil {
		return nil, err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	for _, t := range later {
		h, err := parsePseudonym(t.Pseudonym)
		if err != nil {
			return nil, fmt.Errorf("keyvault: tombstone %q: %w", t.Pseudonym, err)
		}
		var kctx string
		err = tx.QueryRowContext(ctx, `SELECT context FROM keys WHERE id_hash = ?`, h).Scan(&kctx)
		if err == nil {
			if _, err := tx.ExecContext(ctx, `DELETE FROM keys WHERE id_hash = ?`, h); err != nil {
				return nil, err
			}
			r.Keys++
		}
		res, err := tx.ExecContext(ctx, `INSERT OR IGNORE INTO shredded (id_hash, forgotten_at, events_deleted) VALUES (?, ?, ?)`,
			h, t.ForgottenAt, t.EventsDeleted)
		if err != nil {
			return nil, err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			continue
		}
		r.Applied++
		if _, err := tx.ExecContext(ctx, `INSERT INTO audit (time, context, id_hash, reason, requested_by, events_deleted) VALUES (?, ?, ?, ?, ?, ?)`,
			t.ForgottenAt, kctx, hexHash(h), "forgotten after the backup; tombstone applied by kuma restore", "kuma restore", t.EventsDeleted); err != nil {
			return nil, err
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("keyvault: apply tombstones to %s: %w", path, err)
	}
	if _, err := db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return nil, fmt.Errorf("keyvault: checkpoint %s: %w", path, err)
	}
	rows, err := db.QueryContext(ctx, `SELECT id_hash, forgotten_at FROM shredded`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var h []byte
		var at int64
		if err := rows.Scan(&h, &at); err != nil {
			return nil, err
		}
		r.shredded[string(h)] = at
	}
	return r, rows.Err()
}
