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
	st, err := PrepareAll(ctx, db,
		`SELECT version, created_at, updated_at FROM entities WHERE entity = ?`,
		`SELECT first_version, last_version, time, pos FROM idempotency WHERE entity = ? AND key IN (?, ?)`,
		`SELECT version, state, updated_at FROM snapshots WHERE entity = ? AND version <= ?
		 ORDER BY version DESC LIMIT 1`)
	if err != nil {
		return nil, err
	}
	return &readStmts{entity: st[0], idempotency: st[1], latestSnapshot: st[2]}, nil
}

// Preparer is what statements are prepared on: a *sql.DB (each connection
// of the pool gets its own preparation when it first runs one), a *sql.Conn
// or a *sql.Tx.
type Preparer interface {
	PrepareContext(ctx context.Context, query string) (*sql.Stmt, error)
}

// PrepareAll prepares queries on p, in order. On the first that fails it
// closes those it prepared and returns the error.
func PrepareAll(ctx context.Context, p Preparer, queries ...string) ([]*sql.Stmt, error) {
	out := make([]*sql.Stmt, 0, len(queries))
	for _, q := range queries {
		st, err := p.PrepareContext(ctx, q)
		if err != nil {
			for _, done := range out {
				_ = done.Close()
			}
			return nil, fmt.Errorf("sqlite: prepare: %w", err)
		}
		out = append(out, st)
	}
	return out, nil
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
