// Package keyvault keeps one data key (DEK) per entity, wrapped by the master
// key (KEK), in its own SQLite file, and destroys keys on forget
// (crypto-shredding): once a key is gone, every copy of that entity's sealed
// events, in any shard file, stream or backup, is noise.
//
// All operations run on one goroutine that drains whatever is pending into one
// transaction (group commit), so creating the keys of thousands of new
// entities costs a few fsyncs, and a shred can never interleave with a
// create of the same key.
package keyvault

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Version is the keyvault's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// Config of the keyvault.
type Config struct {
	// Path is the keyvault's SQLite file.
	Path string
	// MasterKey is the 32-byte KEK.
	MasterKey []byte
	Logger    *slog.Logger
	Now       func() time.Time
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Path == "" {
		errs = append(errs, errors.New("keyvault: Path is required"))
	}
	if len(c.MasterKey) != envelope.KeySize {
		errs = append(errs, fmt.Errorf("keyvault: the master key must be %d bytes (base64 of 32 random bytes), got %d", envelope.KeySize, len(c.MasterKey)))
	}
	return errors.Join(errs...)
}

// Service is the keyvault. Its methods are safe for concurrent use; they are
// the in-process implementation of what shardnodes need, and Start also
// serves them over NATS.
type Service struct {
	cfg   Config
	nc    *nats.Conn
	kek   *envelope.Key
	idKey []byte // HMAC key for remembering forgotten ids without the ids
	db    *sql.DB
	ops   chan *op
	done  chan struct{}
	svc   micro.Service

	// closeMu is held for reading while an op is queued, so Stop never
	// closes the queue under a sender; closed refuses ops after Stop.
	closeMu sync.RWMutex
	closed  bool
}

// New builds a keyvault; nc may be nil for in-process use only.
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	kek, err := envelope.NewKey(cfg.MasterKey)
	if err != nil {
		return nil, err
	}
	return &Service{cfg: cfg, nc: nc, kek: kek}, nil
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

// Start opens (or creates) the keyvault file, checks the master key against
// it, and serves the NATS endpoints when it has a connection.
func (s *Service) Start(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(s.cfg.Path), 0o700); err != nil {
		return fmt.Errorf("keyvault: %w", err)
	}
	db, err := sql.Open("sqlite", sqlite.DSN(s.cfg.Path, pragmas...))
	if err != nil {
		return fmt.Errorf("keyvault: open %s: %w", s.cfg.Path, err)
	}
	db.SetMaxOpenConns(1)
	s.db = db
	if _, err := db.ExecContext(ctx, schema); err != nil {
		db.Close()
		return fmt.Errorf("keyvault: create schema in %s: %w", s.cfg.Path, err)
	}
	if err := s.loadMeta(ctx); err != nil {
		db.Close()
		return err
	}
	s.closeMu.Lock()
	s.ops = make(chan *op, 4096)
	s.done = make(chan struct{})
	s.closed = false
	s.closeMu.Unlock()
	go s.loop()
	if s.nc != nil {
		if err := s.serve(ctx); err != nil {
			_ = s.Stop(ctx)
			return err
		}
	}
	s.cfg.Logger.Info("keyvault started", "path", s.cfg.Path)
	return nil
}

// loadMeta proves the master key on the file's check value, creating the
// check value and the id-hash key on first start. A wrong key is an error,
// never silent garbage.
func (s *Service) loadMeta(ctx context.Context) error {
	checkAAD := envelope.AAD(envelope.PurposeMeta, "", "check", 0)
	idAAD := envelope.AAD(envelope.PurposeMeta, "", "id-hash-key", 0)
	var check, idSealed []byte
	err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'check'`).Scan(&check)
	if errors.Is(err, sql.ErrNoRows) {
		s.idKey = envelope.NewRandomKey()
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ('check', ?), ('id-hash-key', ?)`,
			s.kek.Seal(nil, []byte("kuma keyvault"), checkAAD), s.kek.Seal(nil, s.idKey, idAAD)); err != nil {
			return fmt.Errorf("keyvault: initialise %s: %w", s.cfg.Path, err)
		}
		return tx.Commit()
	}
	if err != nil {
		return fmt.Errorf("keyvault: read %s: %w", s.cfg.Path, err)
	}
	if _, err := s.kek.Open(check, checkAAD); err != nil {
		return fmt.Errorf("keyvault: the master key does not open %s; it was created with another key "+
			"(check --master-key-file / KUMA_MASTER_KEY; rotate with `kuma keyvault rotate`)", s.cfg.Path)
	}
	if err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'id-hash-key'`).Scan(&idSealed); err != nil {
		return fmt.Errorf("keyvault: read id-hash key: %w", err)
	}
	if s.idKey, err = s.kek.Open(idSealed, idAAD); err != nil {
		return fmt.Errorf("keyvault: id-hash key does not open: %w", err)
	}
	return nil
}

// idHash is what the keyvault remembers of a forgotten id: a keyed hash, so
// the id itself is gone but a later request for it is still recognised.
func (s *Service) idHash(kctx, entity string) []byte {
	m := hmac.New(sha256.New, s.idKey)
	m.Write([]byte(kctx))
	m.Write([]byte{0})
	m.Write([]byte(entity))
	return m.Sum(nil)
}

// Stop stops serving, finishes queued operations and closes the file.
func (s *Service) Stop(ctx context.Context) error {
	if s.svc != nil {
		_ = s.svc.Stop()
		s.svc = nil
	}
	s.closeMu.Lock()
	wasOpen := s.ops != nil && !s.closed
	if wasOpen {
		s.closed = true
		close(s.ops)
	}
	s.closeMu.Unlock()
	if wasOpen {
		<-s.done // queued operations finish
	}
	if s.db != nil {
		err := s.db.Close()
		s.db = nil
		return err
	}
	return nil
}

func (s *Service) serve(ctx context.Context) error {
	svc, err := micro.AddService(s.nc, micro.Config{
		Name: "kuma-keyvault", Version: Version,
		Description: "Per-entity data keys wrapped by the master key; crypto-shredding",
		QueueGroup:  "kuma-keyvault",
	})
	if err != nil {
		return fmt.Errorf("keyvault: register micro service: %w", err)
	}
	s.svc = svc
	add := func(name, subject string, h func(context.Context, []byte) (any, error)) error {
		return svc.AddEndpoint(name, natsbus.Guard(func(req micro.Request) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := h(ctx, req.Data())
			if err != nil {
				if kuma.ErrorCode(err) == kuma.CodeInternal {
					s.cfg.Logger.Error("keyvault request failed", "endpoint", name, "err", err)
				}
				_ = natsbus.MicroError(req, err)
				return
			}
			_ = req.RespondJSON(out)
		}), micro.WithEndpointSubject(subject))
	}
	errs := []error{
		add("key", vaultclient.SubjectKey, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.KeyRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed key request")
			}
			k, err := s.DataKey(ctx, r.Context, r.Entity, r.Create)
			if err != nil {
				return nil, err
			}
			return vaultclient.KeyReply{Key: k}, nil
		}),
		add("shred", vaultclient.SubjectShred, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.ShredRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed shred request")
			}
			return s.Shred(ctx, r)
		}),
		add("forgotten", vaultclient.SubjectForgotten, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.KeyRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed request")
			}
			rec, err := s.Forgotten(ctx, r.Context, r.Entity)
			if err != nil {
				return nil, err
			}
			if rec == nil {
				return nil, kuma.Errorf(kuma.CodeNotFound, "not forgotten")
			}
			return rec, nil
		}),
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("keyvault: add endpoints: %w", err)
	}
	return natsbus.Flush(ctx, s.nc)
}

func hexHash(h []byte) string { return hex.EncodeToString(h[:8]) }
