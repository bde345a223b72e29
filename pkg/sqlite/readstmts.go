package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// readStmts are the readers' statements that run once per request or per
// entity brought to life, prepared once on the readers' pool. database/sql
// gives a *sql.Stmt of a pool its own prepared copy on each connection, the
// first time it runs there. Passing SQL text instead makes SQLite parse and
// plan the query on every call: that was about 5 % of a node's CPU under
// the seed workload, for three one-row lookups.
type readStmts struct {
	entity, idempotency, latestSnapshot *sql.Stmt
}

func prepareReadStmts(ctx context.Context, db *sql.DB) (*readStmts, error) {
	r := &readStmts{}
	var err error
	prep := func(q string) *sql.Stmt {
		if err != nil {
			return nil
		}
		var st *sql.Stmt
		st, err = db.PrepareContext(ctx, q)
		return st
	}
	r.entity = prep(`SELECT version, created_at, updated_at FROM entities WHERE entity = ?`)
	r.idempotency = prep(`SELECT first_version, last_version, time, pos FROM idempotency WHERE entity = ? AND key IN (?, ?)`)
	r.latestSnapshot = prep(`SELECT version, state, updated_at FROM snapshots WHERE entity = ? AND version <= ?
		 ORDER BY version DESC LIMIT 1`)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("sqlite: prepare: %w", err), r.close())
	}
	return r, nil
}

func (r *readStmts) close() error {
	var errs []error
	for _, st := range []*sql.Stmt{r.entity, r.idempotency, r.latestSnapshot} {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	return errors.Join(errs...)
}
