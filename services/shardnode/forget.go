package shardnode

import (
	"context"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// forget erases the entity. It runs on the actor, so no command of this
// entity can run in between, and in an order that a crash at any point
// leaves recoverable:
//
//  1. mark the forget as pending in the shard file (durable);
//  2. shred the key in the keyvault: from here every copy of the entity's
//     sealed events and snapshots, anywhere, is noise;
//  3. announce the forget in the event stream, for read models to drop it;
//  4. delete the entity's rows and the mark in one transaction.
//
// A restart finds any mark left by a crash and does 2 to 4 again; all are
// idempotent, and so is forget itself.
func (a *actor) forget(ctx context.Context, r *kuma.ForgetRequest, requestedBy string) (*kuma.ForgetReply, error) {
	if utf8.RuneCountInString(r.Reason) > kuma.MaxForgetReasonLen {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "reason must be at most %d characters", kuma.MaxForgetReasonLen)
	}
	if a.forgotten != nil {
		return a.forgotten, nil
	}
	if a.version == 0 {
		if err := a.missing(ctx); a.forgotten == nil {
			return nil, err // not_found, or the keyvault's error
		}
		return a.forgotten, nil
	}
	sh := a.sh
	now := sh.node.cfg.Now().UTC().Truncate(time.Microsecond)
	mark := sqlite.PendingForget{Entity: a.id, Reason: r.Reason, RequestedBy: requestedBy, RequestedAt: now}
	if err := sh.store.MarkForget(ctx, mark); err != nil {
		return nil, err
	}
	sh.node.cfg.Failpoint("forget-after-mark")
	rec, err := sh.erase(ctx, mark, a.version)
	if err != nil {
		return nil, err
	}
	a.becomeForgotten(rec)
	return rec, nil
}

// becomeForgotten drops everything the actor held; every later command of
// this id answers entity_forgotten.
func (a *actor) becomeForgotten(rec *kuma.ForgetReply) {
	a.forgotten = rec
	a.version, a.state, a.key = 0, nil, nil
	a.createdAt, a.updatedAt = time.Time{}, time.Time{}
}

// erase is steps 2 to 4 of forget: shred the key, announce, delete the rows.
func (sh *shard) erase(ctx context.Context, p sqlite.PendingForget, events int64) (*kuma.ForgetReply, error) {
	node := sh.node
	// The notice names the entity by its pseudonym, as the stream does.
	pseudonyms, err := node.cfg.Keys.Pseudonyms(ctx, sh.cc.Name, []string{p.Entity})
	if err != nil {
		return nil, err
	}
	if len(pseudonyms) != 1 {
		return nil, kuma.Errorf(kuma.CodeInternal, "the keyvault answered %d pseudonyms for one id", len(pseudonyms))
	}
	rec, err := node.cfg.Keys.Shred(ctx, vaultclient.ShredRequest{
		Context: sh.cc.Name, Entity: p.Entity, Reason: p.Reason, RequestedBy: p.RequestedBy,
		EventsDeleted: events, At: p.RequestedAt,
	})
	if err != nil {
		return nil, err
	}
	node.keys.Drop(sh.cc.Name, p.Entity)
	sh.feedCache.forget(p.Entity)
	node.cfg.Failpoint("forget-after-shred")
	if err := sh.relay.announceForgotten(ctx, pseudonyms[0], p.RequestedAt); err != nil {
		node.cfg.Logger.Warn("forget notice not published", "context", sh.cc.Name, "shard", sh.n, "err", err)
		return nil, err
	}
	if _, err := sh.store.Purge(ctx, p.Entity); err != nil {
		return nil, err
	}
	// The shard's uploaded copy still has the rows (sealed under a key
	// that no longer exists, but with the entity's id and times): replace
	// it at the next tick.
	sh.snapshotDirty.Store(true)
	return rec, nil
}

// finishForgets completes the forgets a crash interrupted, before the shard
// takes any request. It retries while the keyvault is unavailable (it may be
// starting in another process) for up to a minute.
func (sh *shard) finishForgets(ctx context.Context) error {
	pending, err := sh.store.PendingForgets(ctx)
	if err != nil || len(pending) == 0 {
		return err
	}
	for _, p := range pending {
		rec, _, err := sh.store.Entity(ctx, p.Entity)
		if err != nil {
			return err
		}
		deadline := time.Now().Add(time.Minute)
		for {
			_, err = sh.erase(ctx, p, rec.Version)
			if err == nil || !errors.Is(err, kuma.ErrUnavailable) || time.Now().After(deadline) {
				break
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(500 * time.Millisecond):
			}
		}
		if err != nil {
			return fmt.Errorf("shardnode: finish an interrupted forget in shard %d of %q: %w", sh.n, sh.cc.Name, err)
		}
		sh.node.cfg.Logger.Info("finished an interrupted forget", "context", sh.cc.Name, "shard", sh.n)
	}
	return nil
}
