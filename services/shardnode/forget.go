package shardnode

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// erase is steps 2 to 4 of forget (entity/forget.go): shred the key,
// announce, delete the rows. The actors call it through entity.Shard.Erase.
func (sh *shard) erase(ctx context.Context, p sqlite.PendingForget, events int64) (*kuma.ForgetReply, error) {
	// The notice names the entity by its pseudonym, as the stream does.
	pseudonyms, err := sh.vault.Pseudonyms(ctx, sh.cc.Name, []string{p.Entity})
	if err != nil {
		return nil, err
	}
	if len(pseudonyms) != 1 {
		return nil, kuma.Errorf(kuma.CodeInternal, "the keyvault answered %d pseudonyms for one id", len(pseudonyms))
	}
	rec, err := sh.vault.Shred(ctx, vaultclient.ShredRequest{
		Context: sh.cc.Name, Entity: p.Entity, Reason: p.Reason, RequestedBy: p.RequestedBy,
		EventsDeleted: events, At: p.RequestedAt,
	})
	if err != nil {
		return nil, err
	}
	sh.keys.Drop(sh.cc.Name, p.Entity)
	sh.feedCache.forget(p.Entity)
	sh.failpoint("forget-after-shred")
	if err := sh.relay.announceForgotten(ctx, pseudonyms[0], p.RequestedAt); err != nil {
		sh.logger.Warn("forget notice not published", "context", sh.cc.Name, "shard", sh.n, "err", err)
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
		sh.logger.Info("finished an interrupted forget", "context", sh.cc.Name, "shard", sh.n)
	}
	return nil
}
