// Package keyvault keeps one data key (DEK) per entity, wrapped by the master
// key (KEK), and destroys keys on forget (crypto-shredding): once a key is
// gone, every copy of that entity's sealed events, in any shard file, stream
// or backup, is noise.
//
// The wrapped keys live in a store (store.go): a local SQLite file for a
// single node (sqlitestore.go, one goroutine group-committing every pending
// operation), or a JetStream bucket that a cluster replicates
// (jetstreamstore.go), which any number of keyvault instances on any nodes
// share. The master key never leaves the process.
package keyvault

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Version is the keyvault's semver, shown by `nats micro ls`.
const Version = "0.2.0"

// Where a keyvault keeps its keys (Config.Store).
const (
	// StoreFile is a SQLite file of this node's (Config.Path): one keyvault
	// per file, the default for a single `kuma up`.
	StoreFile = "file"
	// StoreJetStream is the JetStream bucket KUMA_KEYS, replicated by the
	// NATS cluster and shared by every keyvault instance of the cluster.
	StoreJetStream = "jetstream"
)

// Config of the keyvault.
type Config struct {
	// Store is StoreFile (default) or StoreJetStream.
	Store string
	// Path is the keyvault's SQLite file (StoreFile). With StoreJetStream,
	// a Path whose file holds keys is imported into the bucket at start
	// (once: the keys then leave the file), so a node that kept its keys
	// in a file loses none when it moves to the bucket.
	Path string
	// Replicas is the least replica count the JetStream bucket is created
	// with (1 if unset); a cluster of three JetStream servers or more
	// gets 3 (natsbus.Replicas). Shardnodes raise it as the cluster grows.
	Replicas int
	// MasterKey is the 32-byte KEK.
	MasterKey []byte
	Logger    *slog.Logger
	Now       func() time.Time
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	switch c.Store {
	case "", StoreFile:
		if c.Path == "" {
			errs = append(errs, errors.New("keyvault: Path is required"))
		}
	case StoreJetStream:
	default:
		errs = append(errs, fmt.Errorf("keyvault: Store must be %q or %q, got %q", StoreFile, StoreJetStream, c.Store))
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
	cfg Config
	nc  *nats.Conn
	kek *envelope.Key
	svc *natsbus.Service

	// mu guards the store and the id key, which Start sets and Stop
	// clears; operations hold it for reading only to pick them up.
	mu    sync.RWMutex
	st    store
	idKey []byte // HMAC key for pseudonyms and for remembering forgotten ids
}

// New builds a keyvault; nc may be nil for in-process use of a file store
// only (the JetStream store needs it).
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Store == "" {
		cfg.Store = StoreFile
	}
	err := cfg.Validate()
	if cfg.Store == StoreJetStream && nc == nil {
		err = errors.Join(err, errors.New("keyvault: the JetStream store needs a NATS connection"))
	}
	if err != nil {
		return nil, err
	}
	kek, err := envelope.NewKey(cfg.MasterKey)
	if err != nil {
		return nil, err
	}
	return &Service{cfg: cfg, nc: nc, kek: kek}, nil
}

// Start opens (or creates) the store, checks the master key against it, and
// serves the NATS endpoints when it has a connection.
func (s *Service) Start(ctx context.Context) error {
	var st store
	var idKey []byte
	var err error
	switch s.cfg.Store {
	case StoreJetStream:
		var js *jetStreamStore
		js, idKey, err = openJetStream(ctx, s.nc, s.kek, s.cfg)
		st = js
	default:
		var fs *sqliteStore
		fs, idKey, err = openSQLite(ctx, s.cfg.Path, s.kek, s.cfg.Logger, s.cfg.Now)
		st = fs
	}
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.st, s.idKey = st, idKey
	s.mu.Unlock()
	if s.nc != nil {
		if err := s.serve(ctx); err != nil {
			_ = s.Stop(ctx)
			return err
		}
	}
	s.cfg.Logger.Info("keyvault started", "store", s.cfg.Store, "path", s.cfg.Path)
	return nil
}

// Stop stops serving, finishes the operations under way and closes the
// store. Calls after Stop answer unavailable; Start may run again.
func (s *Service) Stop(ctx context.Context) error {
	if s.svc != nil {
		_ = s.svc.Stop()
		s.svc = nil
	}
	s.mu.Lock()
	st := s.st
	s.st = nil
	s.mu.Unlock()
	if st == nil {
		return nil
	}
	return st.close()
}

// current is the running store and id key, or unavailable after Stop.
func (s *Service) current() (store, []byte, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.st == nil {
		return nil, nil, kuma.Errorf(kuma.CodeUnavailable, "keyvault is stopped")
	}
	return s.st, s.idKey, nil
}

// idHash is what the keyvault remembers of a forgotten id: a keyed hash, so
// the id itself is gone but a later request for it is still recognised. It
// is also the entity's pseudonym in the event stream (base64url): only the
// keyvault holds its key, so nothing else can tell which id a pseudonym
// stands for, or test a guessed id against the stream. Every instance that
// shares a store shares its id key, so they all name an entity alike.
func idHash(idKey []byte, kctx, entity string) []byte {
	m := hmac.New(sha256.New, idKey)
	m.Write([]byte(kctx))
	m.Write([]byte{0})
	m.Write([]byte(entity))
	return m.Sum(nil)
}

// Pseudonym is the entity's name in the event stream (see idHash); empty
// while the keyvault is stopped.
func (s *Service) Pseudonym(kctx, entity string) string {
	_, idKey, err := s.current()
	if err != nil {
		return ""
	}
	return encodePseudonym(idHash(idKey, kctx, entity))
}

func encodePseudonym(h []byte) string { return base64.RawURLEncoding.EncodeToString(h) }

// parsePseudonym reads a pseudonym back into the id hash it encodes.
func parsePseudonym(p string) ([]byte, error) {
	h, err := base64.RawURLEncoding.DecodeString(p)
	if err != nil || len(h) != sha256.Size {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed pseudonym")
	}
	return h, nil
}

// maxInFlight bounds the requests of one endpoint handled at once.
const maxInFlight = 64

func (s *Service) serve(ctx context.Context) error {
	svc, err := natsbus.AddService(s.nc, natsbus.ServiceConfig{
		Name: "kuma-keyvault", Version: Version,
		Description: "Per-entity data keys wrapped by the master key; crypto-shredding",
		QueueGroup:  "kuma-keyvault",
		// A JetStream store's request waits on the bucket's leader, for
		// seconds while one is elected: the requests behind it must not
		// wait too. The file store queues them into its group commit.
		Concurrency: maxInFlight,
	})
	if err != nil {
		return fmt.Errorf("keyvault: register micro service: %w", err)
	}
	s.svc = svc
	// A backup reads every key and tombstone (a bucket's one message per
	// request): it gets minutes, every other request 30 s.
	timeouts := map[string]time.Duration{"backup": 5 * time.Minute, "tombstones": 5 * time.Minute}
	add := func(name, subject string, h func(context.Context, []byte) (any, error)) error {
		timeout := timeouts[name]
		if timeout == 0 {
			timeout = 30 * time.Second
		}
		return svc.AddEndpoint(name, subject, natsbus.JSONEndpoint{
			Answer: func(ctx context.Context, req micro.Request) (any, error) {
				return h(ctx, req.Data())
			},
			Timeout:  timeout,
			MaxReply: natsbus.ReplyLimit(s.nc),
			Hint:     "ask for the pseudonyms of fewer entities at once",
			Answered: func(_ micro.Request, err error) {
				if kuma.ErrorCode(err) == kuma.CodeInternal {
					s.cfg.Logger.Error("keyvault request failed", "endpoint", name, "err", err)
				}
			},
		})
	}
	errs := []error{
		add("key", vaultclient.SubjectKey, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.KeyRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed key request")
			}
			if r.Pseudonym != "" {
				return s.KeyByPseudonym(ctx, r.Context, r.Pseudonym)
			}
			return s.DataKey(ctx, r.Context, r.Entity, r.Create)
		}),
		add("pseudonyms", vaultclient.SubjectPseudonyms, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.PseudonymsRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed pseudonyms request")
			}
			ps, err := s.Pseudonyms(ctx, r.Context, r.Entities)
			if err != nil {
				return nil, err
			}
			return vaultclient.PseudonymsReply{Pseudonyms: ps}, nil
		}),
		add("shred", vaultclient.SubjectShred, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.ShredRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed shred request")
			}
			return s.Shred(ctx, r)
		}),
		add("backup", vaultclient.SubjectBackup, func(ctx context.Context, b []byte) (any, error) {
			var r kuma.BackupRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed backup request")
			}
			return s.Backup(ctx, r.ID)
		}),
		add("tombstones", vaultclient.SubjectTombstones, func(ctx context.Context, b []byte) (any, error) {
			var r kuma.TombstonesRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed tombstones request")
			}
			return s.Tombstones(ctx, r)
		}),
		add("forgotten", vaultclient.SubjectForgotten, func(ctx context.Context, b []byte) (any, error) {
			var r vaultclient.KeyRequest
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, kuma.Errorf(kuma.CodeBadRequest, "malformed request")
			}
			var rec *kuma.ForgetReply
			var err error
			if r.Pseudonym != "" {
				rec, err = s.ForgottenPseudonym(ctx, r.Context, r.Pseudonym)
			} else {
				rec, err = s.Forgotten(ctx, r.Context, r.Entity)
			}
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
