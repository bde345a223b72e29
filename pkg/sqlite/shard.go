package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Synchronous settings: what an acknowledged commit survives.
const (
	// SyncFull fsyncs the WAL on every commit: an acknowledged event survives
	// a process crash and a power cut. The default.
	SyncFull = "FULL"
	// SyncNormal fsyncs only at checkpoints: an acknowledged event survives a
	// process crash but the last commits may be lost in a power cut.
	SyncNormal = "NORMAL"
	// SyncOff never fsyncs. For tests and benchmarks of the engine itself.
	SyncOff = "OFF"
)

// Config opens one shard file.
type Config struct {
	Path    string // the .db file; its directory is created if missing
	Context string // recorded in the file and checked on every open
	Shard   int
	Shards  int
	// Synchronous is SyncFull (default), SyncNormal or SyncOff.
	Synchronous string
	// Readers is the size of the read-only connection pool (default 4).
	Readers int
	// MaxGroupEvents caps the events in one group commit (default 20,000), so
	// a flood of commits still gets acknowledged in bounded slices.
	MaxGroupEvents int
	// QueueLen is how many commits may wait for the writer (default 1,024).
	QueueLen int
	// OnGroup, when set, is called by the writer after every committed group
	// with its size and how long the transaction (with its fsync) took. It
	// must be quick: it runs on the writer goroutine.
	OnGroup func(commits, events int, took, sync time.Duration)
	// Tracer traces each group commit, linked to the span of every request
	// it serves (nil: off).
	Tracer trace.Tracer
	// Epoch is the lease epoch this writer holds the shard under (0: not
	// clustered, no check). Open records it in the file; a commit is refused
	// with ErrFenced once the file carries a newer one.
	Epoch int64
	// Fence, when set, runs inside every write transaction just before
	// COMMIT; an error (the lease ran out) rolls the transaction back and is
	// returned to every commit of the group.
	Fence func() error
	// Failpoint, when set, is the fault tests' hook: the writer calls it
	// with "commit-before" inside a transaction that writes events, just
	// before COMMIT, and "commit-after" once that COMMIT succeeded, before
	// any of its commits is answered. A transaction of bookkeeping alone
	// (a published mark, a forget mark) does not call it, so a test's Nth
	// hit is the Nth group of appends. Nil: no hook.
	Failpoint func(name string)
	// OnCorrupt, when set, is called once, the first time a read, a write
	// or Check finds the file damaged (see IsCorrupt), with that error. It
	// runs on the goroutine that met it (the writer, a reader, Check), so
	// it must not block or call back into the shard. Commits are refused
	// from then on.
	OnCorrupt func(err error)
	Logger    *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Synchronous == "" {
		c.Synchronous = SyncFull
	}
	if c.Readers <= 0 {
		c.Readers = 4
	}
	if c.MaxGroupEvents <= 0 {
		c.MaxGroupEvents = 20000
	}
	if c.QueueLen <= 0 {
		c.QueueLen = 1024
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Tracer == nil {
		c.Tracer = noop.NewTracerProvider().Tracer("")
	}
}

// Validate reports every problem with the config at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Path == "" {
		errs = append(errs, errors.New("sqlite: Path is required"))
	}
	if c.Shards < 1 {
		errs = append(errs, fmt.Errorf("sqlite: Shards must be 1 or more, got %d", c.Shards))
	}
	if c.Shard < 0 || c.Shard >= c.Shards {
		errs = append(errs, fmt.Errorf("sqlite: Shard must be in [0, %d), got %d", c.Shards, c.Shard))
	}
	switch strings.ToUpper(c.Synchronous) {
	case "", SyncFull, SyncNormal, SyncOff:
	default:
		errs = append(errs, fmt.Errorf("sqlite: Synchronous must be FULL, NORMAL or OFF, got %q", c.Synchronous))
	}
	return errors.Join(errs...)
}

// Shard is one open shard file. Commit may be called from any goroutine;
// commits are applied in the order the writer receives them. Read methods may
// run concurrently with each other and with the writer, and see every commit
// that was acknowledged before they started.
type Shard struct {
	cfg   Config
	wdb   *sql.DB
	wconn *sql.Conn
	rdb   *sql.DB
	queue chan *Commit
	wg    sync.WaitGroup
	stmts *writeStmts
	reads *readStmts

	closeMu sync.RWMutex // held for reading while a commit is queued, so Close never strands one
	closed  bool

	committed chan struct{}

	// tail holds recently committed events for the relay, so that it does
	// not read back from the file what the writer has just written. It is
	// bounded; a relay that falls behind reads from the file instead.
	tailMu   sync.Mutex
	tail     []OutboxEvent
	tailFrom int64 // every committed, unforgotten event from here on is in tail

	lastSync time.Duration // the last COMMIT's duration; the writer's own

	mu      sync.Mutex // guards lastSeq, which the writer advances and Stats reads
	lastSeq int64
	stats   Stats

	corruptMu  sync.Mutex
	corruptErr error // the first corruption met (health.go)
}

// Stats are counters of the writer, for status and benchmarks.
type Stats struct {
	LastSeq  int64 // position of the last committed event
	Commits  int64 // commits acknowledged
	Groups   int64 // transactions (group commits) run
	Events   int64 // events written
	SyncTime time.Duration
}

// Open opens (creating if needed) a shard file, checks that it belongs to the
// same context, shard and shard count, and starts its writer.
func Open(ctx context.Context, cfg Config) (*Shard, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Synchronous = strings.ToUpper(cfg.Synchronous)
	if err := PrepareFile(cfg.Path); err != nil {
		return nil, err
	}
	s := &Shard{cfg: cfg, queue: make(chan *Commit, cfg.QueueLen), committed: make(chan struct{}, 1)}
	if err := s.open(ctx); err != nil {
		s.closeDBs()
		return nil, err
	}
	s.wg.Add(1)
	go s.writeLoop()
	return s, nil
}

// DSN is the modernc.org/sqlite address of the file at path with the given
// pragmas. The path is escaped as the SQLite URI format requires, so a '#',
// '?' or '%' in a directory name opens that file and not another.
func DSN(path string, pragmas ...string) string {
	q := url.Values{}
	for _, p := range pragmas {
		q.Add("_pragma", p)
	}
	esc := strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(path)
	return "file:" + esc + "?" + q.Encode()
}

func (s *Shard) open(ctx context.Context) error {
	var err error
	s.wdb, err = sql.Open("sqlite", DSN(s.cfg.Path,
		"busy_timeout(10000)",
		"journal_mode(WAL)",
		"synchronous("+s.cfg.Synchronous+")",
		"cache_size(-8000)",
		// A forgotten entity's rows are overwritten with zeros, in the
		// pages that keep other rows and in the pages a delete frees
		// (FAST left those as they were, on the freelist, holding the id
		// and the sealed events until reused).
		"secure_delete(ON)",
	))
	if err != nil {
		return fmt.Errorf("sqlite: open %s: %w", s.cfg.Path, err)
	}
	s.wdb.SetMaxOpenConns(1)
	s.wconn, err = s.wdb.Conn(ctx)
	if err != nil {
		return fmt.Errorf("sqlite: open %s: %w", s.cfg.Path, err)
	}
	if _, err := s.wconn.ExecContext(ctx, schema); err != nil {
		return fmt.Errorf("sqlite: create schema in %s: %w", s.cfg.Path, err)
	}
	if err := upgradeSchema(ctx, s.wconn, s.cfg.Path); err != nil {
		return err
	}
	if err := s.checkMeta(ctx); err != nil {
		return err
	}
	// A crash between a purge's commit and its checkpoint left the old
	// pages of a forgotten entity in the WAL: empty it before anything else
	// (no reader is open yet, so it completes). A damaged file is not
	// refused here: the checks that own that decision (health.go) run on.
	if _, err := s.wconn.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		s.cfg.Logger.Warn("checkpoint at open failed", "shard", s.cfg.Shard, "err", err)
	}
	if err := s.claimEpoch(ctx); err != nil {
		return err
	}
	if err := s.wconn.QueryRowContext(ctx, highWaterSQL).Scan(&s.lastSeq); err != nil {
		return fmt.Errorf("sqlite: read last position of %s: %w", s.cfg.Path, err)
	}
	s.tailFrom = s.lastSeq + 1
	if s.stmts, err = prepareWriteStmts(ctx, s.wconn); err != nil {
		return err
	}
	// Readers map the file (mmap_size): a read after a commit then costs no
	// pread syscalls for pages already in the OS cache, which made loading
	// cold entities about a third faster (BenchmarkManyEntities). The writer
	// does not map: an I/O error there must be an error, not a SIGBUS.
	s.rdb, err = sql.Open("sqlite", DSN(s.cfg.Path, "busy_timeout(10000)", "query_only(1)", "cache_size(-2000)", "mmap_size(268435456)"))
	if err != nil {
		return fmt.Errorf("sqlite: open readers of %s: %w", s.cfg.Path, err)
	}
	s.rdb.SetMaxOpenConns(s.cfg.Readers)
	s.rdb.SetMaxIdleConns(s.cfg.Readers)
	s.reads, err = prepareReadStmts(ctx, s.rdb)
	return err
}

// upgradeSchema brings a file written by an older Kuma to schemaVersion,
// in one transaction, and refuses one written by a newer Kuma. A new file
// (no schema in its meta yet) has the current schema already.
func upgradeSchema(ctx context.Context, conn *sql.Conn, path string) (err error) {
	var got string
	err = conn.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'schema'`).Scan(&got)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sqlite: read the schema version of %s: %w", path, err)
	}
	v, err := strconv.Atoi(got)
	switch {
	case err != nil:
		return fmt.Errorf("sqlite: %s holds schema=%q, not a version; refusing to open it", path, got)
	case v > schemaVersion:
		return fmt.Errorf("sqlite: %s was written by a newer Kuma (schema %d; this one reads up to %d); refusing to open it", path, v, schemaVersion)
	case v == schemaVersion:
		return nil
	}
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fmt.Errorf("sqlite: upgrade %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_, _ = conn.ExecContext(ctx, "ROLLBACK")
		}
	}()
	if v < 2 {
		// Every row of a schema-1 file is an event of its own: a run of one,
		// which is the column's default. Adding it rewrites nothing.
		if _, err := conn.ExecContext(ctx, `ALTER TABLE events ADD COLUMN n INTEGER NOT NULL DEFAULT 1`); err != nil {
			return fmt.Errorf("sqlite: upgrade %s to schema 2: %w", path, err)
		}
	}
	if _, err := conn.ExecContext(ctx, `UPDATE meta SET value = ? WHERE key = 'schema'`, strconv.Itoa(schemaVersion)); err != nil {
		return fmt.Errorf("sqlite: upgrade %s: %w", path, err)
	}
	if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
		return fmt.Errorf("sqlite: upgrade %s: %w", path, err)
	}
	return nil
}

// checkMeta records the shard's identity on first open and refuses a file
// that belongs elsewhere: entity → shard must never change silently.
func (s *Shard) checkMeta(ctx context.Context) error {
	want := map[string]string{
		"schema":  strconv.Itoa(schemaVersion),
		"context": s.cfg.Context,
		"shard":   strconv.Itoa(s.cfg.Shard),
		"shards":  strconv.Itoa(s.cfg.Shards),
	}
	for k, v := range want {
		var got string
		err := s.wconn.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, k).Scan(&got)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			if _, err := s.wconn.ExecContext(ctx, `INSERT INTO meta(key, value) VALUES (?, ?)`, k, v); err != nil {
				return fmt.Errorf("sqlite: write meta of %s: %w", s.cfg.Path, err)
			}
		case err != nil:
			return fmt.Errorf("sqlite: read meta of %s: %w", s.cfg.Path, err)
		case got != v:
			return fmt.Errorf("sqlite: %s was created with %s=%s, not %s=%s; refusing to open it (entity to shard placement must never change)",
				s.cfg.Path, k, got, k, v)
		}
	}
	return nil
}

// LastSeq returns the position of the last committed event (0 when empty).
func (s *Shard) LastSeq() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastSeq
}

// Stats returns the writer's counters.
func (s *Shard) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.LastSeq = s.lastSeq
	return st
}

// Close stops taking commits, lets the writer finish every commit already
// queued, and closes the file. It is safe to call more than once.
func (s *Shard) Close() error {
	s.closeMu.Lock()
	if s.closed {
		s.closeMu.Unlock()
		return nil
	}
	s.closed = true
	close(s.queue)
	s.closeMu.Unlock()
	s.wg.Wait()
	return s.closeDBs()
}

func (s *Shard) closeDBs() error {
	var errs []error
	if s.stmts != nil {
		errs = append(errs, s.stmts.close())
		s.stmts = nil
	}
	if s.wconn != nil {
		errs = append(errs, s.wconn.Close())
		s.wconn = nil
	}
	if s.wdb != nil {
		errs = append(errs, s.wdb.Close())
		s.wdb = nil
	}
	if s.reads != nil {
		errs = append(errs, s.reads.close())
		s.reads = nil
	}
	if s.rdb != nil {
		errs = append(errs, s.rdb.Close())
		s.rdb = nil
	}
	return errors.Join(errs...)
}
