package projector

import (
	"context"
	"database/sql"

	"github.com/kumadb/kuma/pkg/sqlite"
)

// catalog records, per projection, which generation answers queries and
// which one a rebuild is building. It is updated before a swap takes effect,
// so a restart opens the generation that was live.
type catalog struct{ db *sql.DB }

func openCatalog(ctx context.Context, path string) (*catalog, error) {
	if err := sqlite.PrepareFile(path); err != nil {
		return nil, err
	}
	db, err := sql.Open("sqlite", sqlite.DSN(path, "busy_timeout(10000)", "journal_mode(WAL)", "synchronous(FULL)"))
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS projections (
		name     TEXT PRIMARY KEY,
		live     INTEGER NOT NULL DEFAULT 0,
		building INTEGER NOT NULL DEFAULT 0
	)`); err != nil {
		db.Close()
		return nil, err
	}
	return &catalog{db: db}, nil
}

// get returns the live and building generations (0 for none).
func (c *catalog) get(ctx context.Context, name string) (live, building int64, err error) {
	err = c.db.QueryRowContext(ctx, `SELECT live, building FROM projections WHERE name = ?`, name).Scan(&live, &building)
	if err == sql.ErrNoRows {
		return 0, 0, nil
	}
	return live, building, err
}

func (c *catalog) setLive(ctx context.Context, name string, gen int64) error {
	_, err := c.db.ExecContext(ctx, `INSERT INTO projections (name, live) VALUES (?, ?)
		ON CONFLICT (name) DO UPDATE SET live = excluded.live,
			building = CASE WHEN building <= excluded.live THEN 0 ELSE building END`, name, gen)
	return err
}

func (c *catalog) setBuilding(ctx context.Context, name string, gen int64) error {
	_, err := c.db.ExecContext(ctx, `UPDATE projections SET building = ? WHERE name = ?`, gen, name)
	return err
}

func (c *catalog) close() error { return c.db.Close() }

// remove forgets a projection (a drop): its generations are gone.
func (c *catalog) remove(ctx context.Context, name string) (bool, error) {
	res, err := c.db.ExecContext(ctx, `DELETE FROM projections WHERE name = ?`, name)
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

// names lists every projection the catalog knows, declared or not.
func (c *catalog) names(ctx context.Context) ([]string, error) {
	rows, err := c.db.QueryContext(ctx, `SELECT name FROM projections ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}
