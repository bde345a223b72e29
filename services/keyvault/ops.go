package keyvault

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

type opKind int

const (
	opKey opKind = iota
	opShred
	opForgotten
)

// op is one request to the keyvault's goroutine.
type op struct {
	kind   opKind
	kctx   string
	entity string
	create bool
	shred  vaultclient.ShredRequest

	key  []byte
	rec  *kuma.ForgetReply
	err  error
	done chan struct{}
}

// maxGroup bounds the operations in one transaction.
const maxGroup = 1000

func (s *Service) submit(ctx context.Context, o *op) error {
	if err := kuma.ValidateContext(o.kctx); err != nil {
		return err
	}
	if err := kuma.ValidateEntityID(o.entity); err != nil {
		return err
	}
	o.done = make(chan struct{})
	s.closeMu.RLock()
	if s.closed || s.ops == nil {
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

// DataKey returns the entity's data key, creating it when create is set.
// It answers kuma.ErrNotFound for no key (and !create) and
// kuma.ErrEntityForgotten for a shredded one. A created key is durable
// before DataKey returns, so no event is ever sealed under a key that a crash
// could lose.
func (s *Service) DataKey(ctx context.Context, kctx, entity string, create bool) ([]byte, error) {
	o := &op{kind: opKey, kctx: kctx, entity: entity, create: create}
	if err := s.submit(ctx, o); err != nil {
		return nil, err
	}
	return o.key, nil
}

// Shred destroys the entity's key, remembers the id as forgotten (by keyed
// hash) and writes an audit record without personal data. Shredding again
// returns the first record.
func (s *Service) Shred(ctx context.Context, r vaultclient.ShredRequest) (*kuma.ForgetReply, error) {
	if utf8.RuneCountInString(r.Reason) > kuma.MaxForgetReasonLen {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "reason is over %d characters", kuma.MaxForgetReasonLen)
	}
	if r.At.IsZero() {
		r.At = s.cfg.Now()
	}
	// Times are stored as unix nanoseconds, exact from 1678 to 2262.
	if y := r.At.Year(); y < 1970 || y > 2200 {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "shred time %s is out of range", r.At.Format(time.RFC3339))
	}
	o := &op{kind: opShred, kctx: r.Context, entity: r.Entity, shred: r}
	if err := s.submit(ctx, o); err != nil {
		return nil, err
	}
	return o.rec, nil
}

// Forgotten returns the forget record of an entity, or nil.
func (s *Service) Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error) {
	o := &op{kind: opForgotten, kctx: kctx, entity: entity}
	if err := s.submit(ctx, o); err != nil {
		return nil, err
	}
	return o.rec, nil
}

func (s *Service) loop() {
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

func (s *Service) runGroup(group []*op) {
	ctx := context.Background()
	err := s.runTx(ctx, group)
	if err == nil && hasShred(group) {
		if _, cerr := s.db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); cerr != nil {
			s.cfg.Logger.Warn("checkpoint after shred failed", "err", cerr)
		}
	}
	for _, o := range group {
		if err != nil {
			s.cfg.Logger.Error("keyvault transaction failed", "ops", len(group), "err", err)
			o.err, o.key, o.rec = kuma.Errorf(kuma.CodeInternal, "keyvault storage failed"), nil, nil
		}
		if err == nil && o.kind == opShred && o.err == nil && s.nc != nil {
			b, _ := json.Marshal(vaultclient.Shredded{Context: o.kctx, Entity: o.entity})
			_ = s.nc.Publish(vaultclient.SubjectShredded, b)
		}
		close(o.done)
	}
}

func (s *Service) runTx(ctx context.Context, group []*op) error {
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
func (s *Service) apply(ctx context.Context, tx *sql.Tx, o *op) error {
	aad := envelope.AAD(envelope.PurposeDataKey, o.kctx, o.entity, 0)
	hash := s.idHash(o.kctx, o.entity)
	switch o.kind {
	case opKey:
		var wrapped []byte
		err := tx.QueryRowContext(ctx, `SELECT wrapped FROM keys WHERE context = ? AND entity = ?`, o.kctx, o.entity).Scan(&wrapped)
		if err == nil {
			key, oerr := s.kek.Open(wrapped, aad)
			if oerr != nil {
				s.cfg.Logger.Error("wrapped key does not open", "context", o.kctx, "id_hash", hexHash(hash))
				o.err = kuma.Errorf(kuma.CodeInternal, "internal error")
				return nil
			}
			o.key = key
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		rec, err := s.shredRecord(ctx, tx, hash, o.entity)
		if err != nil {
			return err
		}
		if rec != nil {
			o.err = kuma.Errorf(kuma.CodeEntityForgotten, "entity %q was forgotten at %s", o.entity, rec.ForgottenAt.Format(time.RFC3339))
			return nil
		}
		if !o.create {
			o.err = kuma.Errorf(kuma.CodeNotFound, "no key for entity %q", o.entity)
			return nil
		}
		key := envelope.NewRandomKey()
		if _, err := tx.ExecContext(ctx, `INSERT INTO keys (context, entity, wrapped, created_at) VALUES (?, ?, ?, ?)`,
			o.kctx, o.entity, s.kek.Seal(nil, key, aad), s.cfg.Now().UnixNano()); err != nil {
			return err
		}
		o.key = key
	case opForgotten:
		rec, err := s.shredRecord(ctx, tx, hash, o.entity)
		if err != nil {
			return err
		}
		o.rec = rec
	case opShred:
		rec, err := s.shredRecord(ctx, tx, hash, o.entity)
		if err != nil {
			return err
		}
		if rec != nil {
			o.rec = rec // already forgotten: the same reply again
			return nil
		}
		r := o.shred
		at := r.At.UTC().Truncate(time.Microsecond)
		if _, err := tx.ExecContext(ctx, `DELETE FROM keys WHERE context = ? AND entity = ?`, o.kctx, o.entity); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO shredded (id_hash, forgotten_at, events_deleted) VALUES (?, ?, ?)`,
			hash, at.UnixNano(), r.EventsDeleted); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO audit (time, context, id_hash, reason, requested_by, events_deleted) VALUES (?, ?, ?, ?, ?, ?)`,
			at.UnixNano(), o.kctx, hexHash(hash), r.Reason, r.RequestedBy, r.EventsDeleted); err != nil {
			return err
		}
		// The audit line names the id only by its keyed hash: no personal data.
		s.cfg.Logger.Info("audit: entity forgotten", "context", o.kctx, "id_hash", hexHash(hash),
			"reason", r.Reason, "requested_by", r.RequestedBy, "events_deleted", r.EventsDeleted, "at", at)
		o.rec = &kuma.ForgetReply{Entity: o.entity, ForgottenAt: at, EventsDeleted: r.EventsDeleted}
	default:
		return fmt.Errorf("keyvault: unknown op %d", o.kind)
	}
	return nil
}

func (s *Service) shredRecord(ctx context.Context, tx *sql.Tx, hash []byte, entity string) (*kuma.ForgetReply, error) {
	var at, n int64
	err := tx.QueryRowContext(ctx, `SELECT forgotten_at, events_deleted FROM shredded WHERE id_hash = ?`, hash).Scan(&at, &n)
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
