package keyvault

import (
	"context"
	"encoding/json"
	"time"
	"unicode/utf8"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// named validates a context and an entity id and returns the running store
// and the id's hash.
func (s *Service) named(kctx, entity string) (store, []byte, error) {
	if err := kuma.ValidateContext(kctx); err != nil {
		return nil, nil, err
	}
	if err := kuma.ValidateEntityID(entity); err != nil {
		return nil, nil, err
	}
	st, idKey, err := s.current()
	if err != nil {
		return nil, nil, err
	}
	return st, idHash(idKey, kctx, entity), nil
}

// byPseudonym validates a context and a pseudonym and returns the running
// store and the id hash the pseudonym encodes.
func (s *Service) byPseudonym(kctx, pseudonym string) (store, []byte, error) {
	if err := kuma.ValidateContext(kctx); err != nil {
		return nil, nil, err
	}
	h, err := parsePseudonym(pseudonym)
	if err != nil {
		return nil, nil, err
	}
	st, _, err := s.current()
	return st, h, err
}

// DataKey returns the entity's data key, creating it when create is set.
// It answers kuma.ErrNotFound for no key (and !create) and
// kuma.ErrEntityForgotten for a shredded one. A created key is durable
// before DataKey returns, so no event is ever sealed under a key that a crash
// could lose.
// The reply carries the entity's pseudonym too (what the relay names it by in
// the stream).
func (s *Service) DataKey(ctx context.Context, kctx, entity string, create bool) (vaultclient.KeyReply, error) {
	st, h, err := s.named(kctx, entity)
	if err != nil {
		return vaultclient.KeyReply{}, err
	}
	dek, _, err := st.key(ctx, kctx, entity, h, create)
	if err != nil {
		return vaultclient.KeyReply{}, err
	}
	return vaultclient.KeyReply{Key: dek, Pseudonym: encodePseudonym(h), Entity: entity}, nil
}

// KeyByPseudonym returns the data key and the id of the entity a stream
// message names by its pseudonym: kuma.ErrEntityForgotten once it is
// shredded (from then on nothing leads from the pseudonym to the id),
// kuma.ErrNotFound for a pseudonym of no entity.
func (s *Service) KeyByPseudonym(ctx context.Context, kctx, pseudonym string) (vaultclient.KeyReply, error) {
	st, h, err := s.byPseudonym(kctx, pseudonym)
	if err != nil {
		return vaultclient.KeyReply{}, err
	}
	dek, entity, err := st.key(ctx, kctx, "", h, false)
	if err != nil {
		return vaultclient.KeyReply{}, err
	}
	return vaultclient.KeyReply{Key: dek, Pseudonym: pseudonym, Entity: entity}, nil
}

// ForgottenPseudonym returns the forget record of the entity of a pseudonym
// (with no id: the keyvault no longer has it), or nil if it was not
// forgotten. Read models confirm a forget notice with it before they drop
// anything.
func (s *Service) ForgottenPseudonym(ctx context.Context, kctx, pseudonym string) (*kuma.ForgetReply, error) {
	st, h, err := s.byPseudonym(kctx, pseudonym)
	if err != nil {
		return nil, err
	}
	return st.forgotten(ctx, kctx, "", h)
}

// MaxPseudonyms bounds the ids of one Pseudonyms request.
const MaxPseudonyms = 10_000

// Pseudonyms returns the pseudonyms of ids, in order. A shardnode rebuilding
// a shard from the stream uses it to find which of its ids a forget notice
// names. It reads no storage.
func (s *Service) Pseudonyms(_ context.Context, kctx string, entities []string) ([]string, error) {
	if err := kuma.ValidateContext(kctx); err != nil {
		return nil, err
	}
	if len(entities) > MaxPseudonyms {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "at most %d ids per pseudonyms request", MaxPseudonyms)
	}
	_, idKey, err := s.current()
	if err != nil {
		return nil, err
	}
	out := make([]string, len(entities))
	for i, e := range entities {
		if err := kuma.ValidateEntityID(e); err != nil {
			return nil, err
		}
		out[i] = encodePseudonym(idHash(idKey, kctx, e))
	}
	return out, nil
}

// Shred destroys the entity's key, remembers the id as forgotten (by keyed
// hash) and writes an audit record without personal data. Shredding again
// returns the first record. Every successful shred is broadcast on
// vaultclient.SubjectShredded, so that other processes drop cached keys.
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
	r.At = r.At.UTC().Truncate(time.Microsecond)
	st, h, err := s.named(r.Context, r.Entity)
	if err != nil {
		return nil, err
	}
	rec, fresh, err := st.shred(ctx, r.Context, r.Entity, h, r)
	if err != nil {
		return nil, err
	}
	if fresh {
		// The audit line names the id only by its keyed hash: no personal data.
		s.cfg.Logger.Info("audit: entity forgotten", "context", r.Context, "id_hash", hexHash(h),
			"reason", r.Reason, "requested_by", r.RequestedBy, "events_deleted", r.EventsDeleted, "at", rec.ForgottenAt)
	}
	if s.nc != nil {
		b, _ := json.Marshal(vaultclient.Shredded{Context: r.Context, Entity: r.Entity})
		_ = s.nc.Publish(vaultclient.SubjectShredded, b)
	}
	return rec, nil
}

// Forgotten returns the forget record of an entity, or nil.
func (s *Service) Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error) {
	st, h, err := s.named(kctx, entity)
	if err != nil {
		return nil, err
	}
	return st.forgotten(ctx, kctx, entity, h)
}
