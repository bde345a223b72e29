package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// BaselinePostgres is the question every user asks first ("why not an
// events table in PostgreSQL?"), answered on the same machine in the same
// run: one COPY per append (the append's events as rows of one
// transaction, acknowledged once PostgreSQL has committed it, fsync as the
// server is configured), through a pool of --pg-pool connections.
const BaselinePostgres = "postgres"

// pgHowTo is how to get a PostgreSQL to compare against, from Debian's
// package, on loopback only.
const pgHowTo = `--baseline postgres needs --pg-dsn, e.g. postgres://kuma@127.0.0.1:5433/kuma?sslmode=disable
  A throwaway local PostgreSQL from Debian's package (as root; nothing listens beyond loopback):
    apt-get install -y postgresql
    install -d -o postgres /tmp/kuma-pg && runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D /tmp/kuma-pg -U kuma --auth=trust
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /tmp/kuma-pg -o "-p 5433 -k /tmp/kuma-pg -c listen_addresses=127.0.0.1" -l /tmp/kuma-pg/log start
    createdb -h 127.0.0.1 -p 5433 -U kuma kuma
  (Debian's defaults: fsync on, synchronous_commit on, so an acknowledged COPY is on disk.)`

// errNoPGDSN refuses the postgres baseline without a server to run it on.
var errNoPGDSN = errors.New(pgHowTo)

// pgBaseline is one run's table in PostgreSQL.
type pgBaseline struct {
	pool  *pgxpool.Pool
	table string
}

// openPostgres connects a pool of c.pgPool and creates a fresh events table
// (dropped by close).
func openPostgres(ctx context.Context, c config) (*pgBaseline, error) {
	if c.pgDSN == "" {
		return nil, errNoPGDSN
	}
	cfg, err := pgxpool.ParseConfig(c.pgDSN)
	if err != nil {
		return nil, fmt.Errorf("--pg-dsn: %w", err)
	}
	cfg.MaxConns = int32(c.pgPool)
	cfg.MinConns = int32(c.pgPool)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres at %s: %w", cfg.ConnConfig.Host, err)
	}
	b := &pgBaseline{pool: pool, table: fmt.Sprintf("kuma_bench_events_%d_%d", os.Getpid(), time.Now().UnixNano())}
	// The shape a team would write for an event store: one row per
	// event, its version unique per entity, the data as jsonb.
	if _, err := pool.Exec(ctx, `CREATE TABLE `+b.table+` (
		entity  text        NOT NULL,
		version bigint      NOT NULL,
		type    text        NOT NULL,
		data    jsonb       NOT NULL,
		time    timestamptz NOT NULL,
		PRIMARY KEY (entity, version))`); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: create %s: %w", b.table, err)
	}
	return b, nil
}

var pgColumns = []string{"entity", "version", "type", "data", "time"}

// commit stores one append: COPY of its rows, one transaction.
func (b *pgBaseline) commit(ctx context.Context, _ int, entity string, versions []int64, payload []byte, at time.Time) error {
	rows := make([][]any, len(versions))
	for i, v := range versions {
		rows[i] = []any{entity, v, "UserUpdated", payload, at}
	}
	n, err := b.pool.CopyFrom(ctx, pgx.Identifier{b.table}, pgColumns, pgx.CopyFromRows(rows))
	if err == nil && n != int64(len(rows)) {
		err = fmt.Errorf("postgres: COPY stored %d of %d rows", n, len(rows))
	}
	return err
}

// count is how many events the table holds.
func (b *pgBaseline) count(ctx context.Context) (int64, error) {
	var n int64
	err := b.pool.QueryRow(ctx, `SELECT count(*) FROM `+b.table).Scan(&n)
	return n, err
}

// close drops the table and the pool.
func (b *pgBaseline) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = b.pool.Exec(ctx, `DROP TABLE IF EXISTS `+b.table)
	b.pool.Close()
}
