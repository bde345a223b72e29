package entity

import (
	"context"
	"time"
	"unicode/utf8"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
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
func (a *Actor) forget(ctx context.Context, r *kuma.ForgetRequest, requestedBy string) (*kuma.ForgetReply, error) {
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
	now := sh.Now().UTC().Truncate(time.Microsecond)
	mark := sqlite.PendingForget{Entity: a.id, Reason: r.Reason, RequestedBy: requestedBy, RequestedAt: now}
	if err := sh.Store.MarkForget(ctx, mark); err != nil {
		return nil, err
	}
	a.failpoint("forget-after-mark")
	rec, err := sh.Erase(ctx, mark, a.version)
	if err != nil {
		return nil, err
	}
	a.becomeForgotten(rec)
	return rec, nil
}

// becomeForgotten drops everything the actor held; every later command of
// this id answers entity_forgotten.
func (a *Actor) becomeForgotten(rec *kuma.ForgetReply) {
	a.forgotten = rec
	a.version, a.state, a.key = 0, nil, nil
	a.createdAt, a.updatedAt = time.Time{}, time.Time{}
}
