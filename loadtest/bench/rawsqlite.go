package bench

import (
	"context"
	"database/sql"
	"strings"
	"sync"

	"github.com/kumadb/kuma/pkg/sqlite"
)

// rawWriter is the textbook way to write events to SQLite fast, with none of
// Kuma's code: one file, one connection, one goroutine that takes whatever
// commits are waiting and writes them in one transaction (group commit),
// then answers them all. It stores what an event store must (position,
// entity, version, payload, time, and the index that reads an entity's
// events in order), and nothing else: no entity rows, no idempotency keys,
// no sealing. It exists to be measured against, so it is kept separate from
// pkg/sqlite: a baseline built from Kuma's own writer would inherit its
// choices.
type rawWriter struct {
	db       *sql.DB
	conn     *sql.Conn
	one      *sql.Stmt // INSERT of one row
	multi    *sql.Stmt // INSERT of rawRowsPerStmt rows
	multiRow bool
	queue    chan *rawCommit
	started  bool
	wg       sync.WaitGroup
	pos      int64
}

type rawCommit struct {
	entity   string
	versions []int64
	payload  []byte
	at       int64
	done     chan error
}

const (
	rawRowsPerStmt = 100
	rawMaxGroup    = 20_000 // events per transaction, as Kuma's writer
)

// openRawWriter creates the file at path. multiRow writes up to
// rawRowsPerStmt rows per INSERT statement instead of one.
func openRawWriter(ctx context.Context, path, synchronous string, multiRow bool) (*rawWriter, error) {
	db, err := sql.Open("sqlite", sqlite.DSN(path, "journal_mode(WAL)", "synchronous("+synchronous+")", "busy_timeout(10000)"))
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	w := &rawWriter{db: db, multiRow: multiRow, queue: make(chan *rawCommit, 1024)}
	if w.conn, err = db.Conn(ctx); err != nil {
		db.Close()
		return nil, err
	}
	if _, err := w.conn.ExecContext(ctx, `CREATE TABLE events (
		pos INTEGER PRIMARY KEY, entity TEXT NOT NULL, version INTEGER NOT NULL, payload BLOB NOT NULL, time INTEGER NOT NULL);
		CREATE UNIQUE INDEX events_entity_version ON events (entity, version);`); err != nil {
		w.close()
		return nil, err
	}
	row := "(?, ?, ?, ?, ?)"
	if w.one, err = w.conn.PrepareContext(ctx, "INSERT INTO events VALUES "+row); err != nil {
		w.close()
		return nil, err
	}
	if w.multi, err = w.conn.PrepareContext(ctx, "INSERT INTO events VALUES "+strings.Repeat(row+",", rawRowsPerStmt-1)+row); err != nil {
		w.close()
		return nil, err
	}
	w.started = true
	w.wg.Add(1)
	go w.loop()
	return w, nil
}

// commit queues one entity's events and waits until they are durable.
func (w *rawWriter) commit(ctx context.Context, c *rawCommit) error {
	c.done = make(chan error, 1)
	select {
	case w.queue <- c:
	case <-ctx.Done():
		return ctx.Err()
	}
	return <-c.done
}

func (w *rawWriter) loop() {
	defer w.wg.Done()
	var group []*rawCommit
	for first := range w.queue {
		group = append(group[:0], first)
		n := len(first.versions)
	drain:
		for n < rawMaxGroup {
			select {
			case c, ok := <-w.queue:
				if !ok {
					break drain
				}
				group = append(group, c)
				n += len(c.versions)
			default:
				break drain
			}
		}
		err := w.write(group)
		for _, c := range group {
			c.done <- err
		}
	}
}

func (w *rawWriter) write(group []*rawCommit) (err error) {
	ctx := context.Background()
	if _, err := w.conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_, _ = w.conn.ExecContext(ctx, "ROLLBACK")
		}
	}()
	pos := w.pos
	args := make([]any, 0, 5*rawRowsPerStmt)
	for _, c := range group {
		for _, v := range c.versions {
			pos++
			row := []any{pos, c.entity, v, c.payload, c.at}
			if !w.multiRow {
				if _, err := w.one.ExecContext(ctx, row...); err != nil {
					return err
				}
				continue
			}
			if args = append(args, row...); len(args) == cap(args) {
				if _, err := w.multi.ExecContext(ctx, args...); err != nil {
					return err
				}
				args = args[:0]
			}
		}
	}
	// What does not fill a multi-row statement goes one row at a time.
	for i := 0; i < len(args); i += 5 {
		if _, err := w.one.ExecContext(ctx, args[i:i+5]...); err != nil {
			return err
		}
	}
	if _, err := w.conn.ExecContext(ctx, "COMMIT"); err != nil {
		return err
	}
	w.pos = pos
	return nil
}

func (w *rawWriter) close() error {
	if w.started {
		close(w.queue)
		w.wg.Wait()
	}
	if w.conn != nil {
		w.conn.Close()
	}
	return w.db.Close()
}
