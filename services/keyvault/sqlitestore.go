package keyvault

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// sqliteStore keeps the keys in one SQLite file of this node's. All
// operations run on one goroutine that drains whatever is pending into one
// transaction (group commit), so creating the keys of thousands of new
// entities costs a few fsyncs, and a shred can never interleave with a
// create of the same key.
type sqliteStore struct {
	path string
	kek  *envelope.Key
	log  *slog.Logger
	now  func() time.Time
	db   *sql.DB
	ops  chan *op
	done chan struct{}
	// stmts are the statements every new entity's key runs (its look-ups
	// and its insert), prepared once: parsed on every call they were about
	// 2 % of a node's CPU under the seed workload (10,000 new entities).
	stmts keyStmts

	// closeMu is held for reading while an op is queued, so close never
	// closes the queue under a sender; closed refuses ops after close.
	closeMu sync.RWMutex
	closed  bool
}

// pragmas: WAL with synchronous=FULL costs one fsync per group, which keeps
// key creation off the append path's critical time (a rollback journal costs
// three, and about 15% of the end-to-end benchmark). secure_delete
// overwrites deleted keys in the pages, and after every shred the WAL is
// checkpointed and truncated, so no old page image with the key survives in
// it.
var pragmas = []string{"busy_timeout(10000)", "journal_mode(WAL)", "synchronous(FULL)", "secure_delete(ON)"}

const schema = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
	context    TEXT    NOT NULL,
	entity     TEXT    NOT NULL,
	wrapped    BLOB    NOT NULL,
	created_at INTEGER NOT NULL,
	id_hash    BLOB,
	PRIMARY KEY (context, entity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shredded (
	id_hash        BLOB    PRIMARY KEY,
	forgotten_at   INTEGER NOT NULL,
	events_deleted INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
	id             INTEGER PRIMARY KEY,
	time           INTEGER NOT NULL,
	context        TEXT    NOT NULL,
	id_hash        TEXT    NOT NULL,
	reason         TEXT    NOT NULL,
	requested_by   TEXT    NOT NULL,
	events_deleted INTEGER NOT NULL
);
`

// movedKey is the meta row a file gets once its keys were imported into a
// JetStream bucket: from then on the file holds no key, and opening it as a
// store would hand out new keys for entities that have old ones.
const movedKey = "moved-to"

// openSQLite opens (or creates) the keyvault file, checks the master key
// against it and starts the op loop. It returns the file's id key.
func openSQLite(ctx context.Context, path string, kek *envelope.Key, log *slog.Logger, now func() time.Time) (*sqliteStore, []byte, error) {
	db, err := openFile(ctx, path)
	if err != nil {
		return nil, nil, err
	}
	var moved []byte
	err = db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, movedKey).Scan(&moved)
	if err == nil {
		db.Close()
		return nil, nil, fmt.Errorf("keyvault: the keys of %s were moved to %s; this node's keyvault now uses that bucket "+
			"(start this node clustered, with --cluster-listen, where its keyvault uses that bucket)", path, moved)
	}
	if !errors.Is(err, sql.ErrNoRows) {
		db.Close()
		return nil, nil, fmt.Errorf("keyvault: read %s: %w", path, err)
	}
	idKey, err := loadMeta(ctx, db, path, kek)
	if err != nil {
		db.Close()
		return nil, nil, err
	}
	s := &sqliteStore{path: path, kek: kek, log: log, now: now, db: db,
		ops: make(chan *op, 4096), done: make(chan struct{})}
	if err := s.migratePseudonyms(ctx, idKey); err != nil {
		db.Close()
		return nil, nil, err
	}
	if s.stmts, err = prepareKeyStmts(ctx, db); err != nil {
		db.Close()
		return nil, nil, err
	}
	go s.loop()
	return s, idKey, nil
}

// keyStmts are prepared on the store's one connection; a transaction runs
// them through Tx.StmtContext, which reuses that preparation.
type keyStmts struct {
	byEntity, byHash, shredded, insert *sql.Stmt
}

func prepareKeyStmts(ctx context.Context, db *sql.DB) (keyStmts, error) {
	st, err := sqlite.PrepareAll(ctx, db,
		`SELECT wrapped FROM keys WHERE context = ? AND entity = ?`,
		`SELECT entity, wrapped FROM keys WHERE id_hash = ? AND context = ?`,
		`SELECT forgotten_at, events_deleted FROM shredded WHERE id_hash = ?`,
		`INSERT INTO keys (context, entity, wrapped, created_at, id_hash) VALUES (?, ?, ?, ?, ?)`)
	if err != nil {
		return keyStmts{}, fmt.Errorf("keyvault: %w", err)
	}
	return keyStmts{byEntity: st[0], byHash: st[1], shredded: st[2], insert: st[3]}, nil
}

// openFile opens (or creates) a keyvault file with its schema.
func openFile(ctx context.Context, path string) (*sql.DB, error) {
	if err := sqlite.PrepareFile(path); err != nil {
		return nil, fmt.Errorf("keyvault: %w", err)
	}
	db, err := sql.Open("sqlite", sqlite.DSN(path, pragmas...))
	if err != nil {
		return nil, fmt.Errorf("keyvault: open %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("keyvault: create schema in %s: %w", path, err)
	}
	return db, nil
}

var (
	checkAAD = envelope.AAD(envelope.PurposeMeta, "", "check", 0)
	idKeyAAD = envelope.AAD(envelope.PurposeMeta, "", "id-hash-key", 0)
)

// loadMeta proves the master key on the file's check value, creating the
// check value and the id-hash key on first start. A wrong key is an error,
// never silent garbage.
func loadMeta(ctx context.Context, db *sql.DB, path string, kek *envelope.Key) ([]byte, error) {
	var check, idSealed []byte
	err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'check'`).Scan(&check)
	if errors.Is(err, sql.ErrNoRows) {
		idKey := envelope.NewRandomKey()
		if err := writeMeta(ctx, db, kek, idKey); err != nil {
			return nil, fmt.Errorf("keyvault: initialise %s: %w", path, err)
		}
		return idKey, nil
	}
	if err != nil {
		return nil, fmt.Errorf("keyvault: read %s: %w", path, err)
	}
	if _, err := kek.Open(check, checkAAD); err != nil {
		return nil, fmt.Errorf("keyvault: the master key does not open %s; it was created with another key "+
			"(check --master-key-file / KUMA_MASTER_KEY; rotate with `kuma keyvault rotate`)", path)
	}
	if err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'id-hash-key'`).Scan(&idSealed); err != nil {
		return nil, fmt.Errorf("keyvault: read id-hash key: %w", err)
	}
	idKey, err := kek.Open(idSealed, idKeyAAD)
	if err != nil {
		return nil, fmt.Errorf("keyvault: id-hash key does not open: %w", err)
	}
	return idKey, nil
}

// writeMeta writes a new file's check value and its id key, both sealed
// by the master key.
func writeMeta(ctx context.Context, db interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, kek *envelope.Key, idKey []byte) error {
	_, err := db.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ('check', ?), ('id-hash-key', ?)`,
		kek.Seal(nil, []byte("kuma keyvault"), checkAAD), kek.Seal(nil, idKey, idKeyAAD))
	return err
}

// migratePseudonyms gives keys created before pseudonyms their id hash, so
// that they can be found by it, and indexes it.
func (s *sqliteStore) migratePseudonyms(ctx context.Context, idKey []byte) error {
	var has int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('keys') WHERE name = 'id_hash'`).Scan(&has); err != nil {
		return fmt.Errorf("keyvault: read schema of %s: %w", s.path, err)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if has == 0 {
		if _, err := tx.ExecContext(ctx, `ALTER TABLE keys ADD COLUMN id_hash BLOB`); err != nil {
			return fmt.Errorf("keyvault: add id_hash to %s: %w", s.path, err)
		}
	}
	rows, err := tx.QueryContext(ctx, `SELECT context, entity FROM keys WHERE id_hash IS NULL`)
	if err != nil {
		return err
	}
	var todo [][2]string
	for rows.Next() {
		var c, e string
		if err := rows.Scan(&c, &e); err != nil {
			rows.Close()
			return err
		}
		todo = append(todo, [2]string{c, e})
	}
	rows.Close()
	for _, k := range todo {
		if _, err := tx.ExecContext(ctx, `UPDATE keys SET id_hash = ? WHERE context = ? AND entity = ?`, idHash(idKey, k[0], k[1]), k[0], k[1]); err != nil {
			return err
		}
	}
	if _, err := tx.ExecContext(ctx, `CREATE UNIQUE INDEX IF NOT EXISTS keys_id_hash ON keys (id_hash)`); err != nil {
		return fmt.Errorf("keyvault: index id_hash in %s: %w", s.path, err)
	}
	if len(todo) > 0 {
		s.log.Info("keyvault: keys given their pseudonyms", "keys", len(todo))
	}
	return tx.Commit()
}

func (s *sqliteStore) close() error {
	s.closeMu.Lock()
	wasOpen := !s.closed
	if wasOpen {
		s.closed = true
		close(s.ops)
	}
	s.closeMu.Unlock()
	if !wasOpen {
		return nil
	}
	<-s.done // queued operations finish
	var errs []error
	for _, st := range []*sql.Stmt{s.stmts.byEntity, s.stmts.byHash, s.stmts.shredded, s.stmts.insert} {
		errs = append(errs, st.Close())
	}
	return errors.Join(append(errs, s.db.Close())...)
}

type opKind int

const (
	opKey opKind = iota
	opShred
	opForgotten
)

// op is one request to the store's goroutine.
type op struct {
	kind   opKind
	kctx   string
	entity string // empty: found by hash (a pseudonym), and set by the op
	hash   []byte
	create bool
	shred  vaultclient.ShredRequest

	key   []byte
	rec   *kuma.ForgetReply
	fresh bool
	err   error
	done  chan struct{}
}

// maxGroup bounds the operations in one transaction.
const maxGroup = 1000

func (s *sqliteStore) submit(ctx context.Context, o *op) error {
	o.done = make(chan struct{})
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		return kuma.Errorf(kuma.CodeUnavailable, "keyvault is stopped")
	}
	select {
	case s.ops <- o:
	case <-ctx.Done():
		s.closeMu.RUnlock()
		return kuma.Errorf(kuma.CodeTimeout, "keyvault busy")
	}
	s.closeMu.RUnlock()
	<-o.done // once taken, an operation's outcome is always waited for
	return o.err
}

func (s *sqliteStore) key(ctx context.Context, kctx, entity string, hash []byte, create bool) ([]byte, string, error) {
	o := &op{kind: opKey, kctx: kctx, entity: entity, hash: hash, create: create}
	if err := s.submit(ctx, o); err != nil {
		return nil, "", err
	}
	return o.key, o.entity, nil
}

func (s *sqliteStore) shred(ctx context.Context, kctx, entity string, hash []byte, r vaultclient.ShredRequest) (*kuma.ForgetReply, bool, error) {
	o := &op{kind: opShred, kctx: kctx, entity: entity, hash: hash, shred: r}
	if err := s.submit(ctx, o); err != nil {
		return nil, false, err
	}
	return o.rec, o.fresh, nil
}

func (s *sqliteStore) forgotten(ctx context.Context, kctx, entity string, hash []byte) (*kuma.ForgetReply, error) {
	o := &op{kind: opForgotten, kctx: kctx, entity: entity, hash: hash}
	if err := s.submit(ctx, o); err != nil {
		return nil, err
	}
	return o.rec, nil
}

func (s *sqliteStore) loop() {
	defer close(s.done)
	group := make([]*op, 0, 64)
	for first := range s.ops {
		group = append(group[:0], first)
	drain:
		for len(group) < maxGroup {
			select {
			case o, ok := <-s.ops:
				if !ok {
					break drain
				}
				group = append(group, o)
			default:
				break drain
			}
		}
		s.runGroup(group)
	}
}

func (s *sqliteStore) runGroup(group []*op) {
	ctx := context.Background()
	err := s.runTx(ctx, group)
	if err == nil && hasShred(group) {
		if _, cerr := s.db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); cerr != nil {
			s.log.Warn("checkpoint after shred failed", "err", cerr)
		}
	}
	for _, o := range group {
		if err != nil {
			s.log.Error("keyvault transaction failed", "ops", len(group), "err", err)
			o.err, o.key, o.rec, o.fresh = kuma.Errorf(kuma.CodeInternal, "keyvault storage failed"), nil, nil, false
		}
		close(o.done)
	}
}

func (s *sqliteStore) runTx(ctx context.Context, group []*op) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, o := range group {
		if err := s.apply(ctx, tx, o); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// apply runs one op inside the group's transaction. Expected outcomes (no
// key, forgotten) are set on the op; only storage failures are returned.
func (s *sqliteStore) apply(ctx context.Context, tx *sql.Tx, o *op) error {
	byHash := o.entity == ""
	switch o.kind {
	case opKey:
		var wrapped []byte
		var err error
		if byHash {
			err = tx.StmtContext(ctx, s.stmts.byHash).QueryRowContext(ctx, o.hash, o.kctx).Scan(&o.entity, &wrapped)
		} else {
			err = tx.StmtContext(ctx, s.stmts.byEntity).QueryRowContext(ctx, o.kctx, o.entity).Scan(&wrapped)
		}
		aad := envelope.AAD(envelope.PurposeDataKey, o.kctx, o.entity, 0)
		if err == nil {
			key, oerr := s.kek.Open(wrapped, aad)
			if oerr != nil {
				s.log.Error("wrapped key does not open", "context", o.kctx, "id_hash", hexHash(o.hash))
				o.err = kuma.Errorf(kuma.CodeInternal, "internal error")
				return nil
			}
			o.key = key
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		rec, err := shredRecord(ctx, tx.StmtContext(ctx, s.stmts.shredded), o.hash, o.entity)
		if err != nil {
			return err
		}
		switch {
		case rec != nil:
			o.err = forgottenError(o.entity, rec)
		case byHash:
			o.err = kuma.Errorf(kuma.CodeNotFound, "no key for that pseudonym")
		case !o.create:
			o.err = kuma.Errorf(kuma.CodeNotFound, "no key for entity %q", o.entity)
		default:
			key := envelope.NewRandomKey()
			if _, err := tx.StmtContext(ctx, s.stmts.insert).ExecContext(ctx,
				o.kctx, o.entity, s.kek.Seal(nil, key, aad), s.now().UnixNano(), o.hash); err != nil {
				return err
			}
			o.key = key
		}
	case opForgotten:
		rec, err := shredRecord(ctx, tx.StmtContext(ctx, s.stmts.shredded), o.hash, o.entity)
		if err != nil {
			return err
		}
		o.rec = rec
	case opShred:
		rec, err := shredRecord(ctx, tx.StmtContext(ctx, s.stmts.shredded), o.hash, o.entity)
		if err != nil {
			return err
		}
		if rec != nil {
			o.rec = rec // already forgotten: the same reply again
			return nil
		}
		r := o.shred
		if _, err := tx.ExecContext(ctx, `DELETE FROM keys WHERE context = ? AND entity = ?`, o.kctx, o.entity); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO shredded (id_hash, forgotten_at, events_deleted) VALUES (?, ?, ?)`,
			o.hash, r.At.UnixNano(), r.EventsDeleted); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO audit (time, context, id_hash, reason, requested_by, events_deleted) VALUES (?, ?, ?, ?, ?, ?)`,
			r.At.UnixNano(), o.kctx, hexHash(o.hash), r.Reason, r.RequestedBy, r.EventsDeleted); err != nil {
			return err
		}
		o.rec = &kuma.ForgetReply{Entity: o.entity, ForgottenAt: r.At, EventsDeleted: r.EventsDeleted}
		o.fresh = true
	default:
		return fmt.Errorf("keyvault: unknown op %d", o.kind)
	}
	return nil
}

// forgottenError is entity_forgotten, naming the id when the caller gave it
// (never when it asked by pseudonym: the id must not leak from a hash).
func forgottenError(entity string, rec *kuma.ForgetReply) error {
	if entity == "" {
		return kuma.Errorf(kuma.CodeEntityForgotten, "the entity was forgotten at %s", rec.ForgottenAt.Format(time.RFC3339))
	}
	return kuma.Errorf(kuma.CodeEntityForgotten, "entity %q was forgotten at %s", entity, rec.ForgottenAt.Format(time.RFC3339))
}

// shredRecord reads the shred record of hash with st (keyStmts.shredded,
// in the caller's transaction).
func shredRecord(ctx context.Context, st *sql.Stmt, hash []byte, entity string) (*kuma.ForgetReply, error) {
	var at, n int64
	err := st.QueryRowContext(ctx, hash).Scan(&at, &n)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &kuma.ForgetReply{Entity: entity, ForgottenAt: time.Unix(0, at).UTC(), EventsDeleted: n}, nil
}

func hasShred(group []*op) bool {
	for _, o := range group {
		if o.kind == opShred && o.err == nil {
			return true
		}
	}
	return false
}
