package keyvault

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// Rotate re-wraps every data key (and the vault's own meta values) from the
// old master key to the new one, in one transaction: either every key is
// under the new master key or none is. Run it with the keyvault stopped.
// Data keys do not change, so no event needs re-sealing.
//
// Rotate covers the file store only. A file whose keys were imported into
// the JetStream bucket is refused: the keys are no longer in it, and
// rotating the bucket's master key (re-wrapping every key message and
// securely erasing the old ones, with every instance stopped) is not
// built yet.
func Rotate(ctx context.Context, path string, oldKey, newKey []byte) (keys int, err error) {
	oldK, err := envelope.NewKey(oldKey)
	if err != nil {
		return 0, fmt.Errorf("old master key: %w", err)
	}
	newK, err := envelope.NewKey(newKey)
	if err != nil {
		return 0, fmt.Errorf("new master key: %w", err)
	}
	if _, err := os.Stat(path); err != nil {
		return 0, fmt.Errorf("keyvault file: %w (a cluster member keeps its keys in the JetStream bucket %s instead, whose master-key rotation is not built yet)", err, cluster.KeysBucket)
	}
	db, err := sql.Open("sqlite", sqlite.DSN(path, pragmas...)+"&mode=rw")
	if err != nil {
		return 0, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer tx.Rollback()

	var moved []byte
	if err := tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, movedKey).Scan(&moved); err == nil {
		return 0, fmt.Errorf("the keys of %s were moved to %s: rotating the master key of the cluster's bucket is not supported yet "+
			"(see docs/security.md); nothing was changed", path, moved)
	}
	for _, name := range []string{"check", "id-hash-key"} {
		aad := envelope.AAD(envelope.PurposeMeta, "", name, 0)
		var v []byte
		if err := tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, name).Scan(&v); err != nil {
			return 0, fmt.Errorf("read %s: %w (is %s a keyvault?)", name, err, path)
		}
		plain, err := oldK.Open(v, aad)
		if err != nil {
			return 0, errors.New("the old master key does not open this keyvault")
		}
		if _, err := tx.ExecContext(ctx, `UPDATE meta SET value = ? WHERE key = ?`, newK.Seal(nil, plain, aad), name); err != nil {
			return 0, err
		}
	}
	rows, err := tx.QueryContext(ctx, `SELECT context, entity, wrapped FROM keys`)
	if err != nil {
		return 0, err
	}
	type rewrap struct {
		ctx, entity string
		wrapped     []byte
	}
	var all []rewrap
	for rows.Next() {
		var r rewrap
		if err := rows.Scan(&r.ctx, &r.entity, &r.wrapped); err != nil {
			rows.Close()
			return 0, err
		}
		all = append(all, r)
	}
	rows.Close()
	for _, r := range all {
		aad := envelope.AAD(envelope.PurposeDataKey, r.ctx, r.entity, 0)
		dek, err := oldK.Open(r.wrapped, aad)
		if err != nil {
			return 0, fmt.Errorf("a data key does not open under the old master key; nothing was changed")
		}
		if _, err := tx.ExecContext(ctx, `UPDATE keys SET wrapped = ? WHERE context = ? AND entity = ?`,
			newK.Seal(nil, dek, aad), r.ctx, r.entity); err != nil {
			return 0, err
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, err
	}
	// No page wrapped under the old key may stay behind in the WAL.
	if _, err := db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return len(all), fmt.Errorf("checkpoint after rotation: %w", err)
	}
	return len(all), nil
}
