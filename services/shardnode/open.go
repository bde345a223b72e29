package shardnode

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// openOwned opens a shard this node has just leased: it picks the
// furthest trustworthy copy (local file or uploaded snapshot), catches it up
// from the stream and claims the shard in the stream.
func (s *Service) openOwned(ctx context.Context, cc *ContextConfig, n int, lease cluster.Lease, prev *cluster.Lease, sent time.Duration) (*shard, error) {
	prevEpoch, wrote := trustedEpochs(prev) // decide.go
	path := shardPath(s.cfg.DataDir, cc.Name, n)
	base, err := s.chooseBase(ctx, cc, n, path, prevEpoch, wrote)
	if err != nil {
		return nil, err
	}
	sh, err := s.openShard(ctx, cc, n, lease, sent)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*shard, error) {
		sh.stopServing(ctx)
		_ = sh.store.Close()
		return nil, err
	}
	if base.truncate {
		dropped, err := sh.store.TruncateAfter(ctx, base.trusted)
		if err != nil {
			return fail(err)
		}
		if dropped > 0 {
			s.cfg.Logger.Warn("dropped events this node committed but never published before another node took the shard over",
				"context", cc.Name, "shard", n, "events", dropped)
		}
	}
	if err := sh.catchUpAndClaim(ctx, base.fromStreamSeq, lease.Epoch); err != nil {
		return fail(err)
	}
	if err := sh.finishForgets(ctx); err != nil {
		return fail(err)
	}
	if err := sh.relay.resume(ctx); err != nil {
		return fail(err)
	}
	// Caught up and claimed: the file is the shard's whole history as of
	// this epoch, before the lease says Serving (what a failed take after
	// this one trusts).
	if err := sh.store.MarkWhole(ctx); err != nil {
		return fail(err)
	}
	sh.relay.start()
	if err := sh.subscribe(); err != nil {
		return fail(err)
	}
	return sh, nil
}

type baseChoice struct {
	trusted       int64  // positions up to here are the shard's true history
	truncate      bool   // drop what lies after trusted
	fromStreamSeq uint64 // catch up from the stream after this sequence
}

// chooseBase puts the best starting copy at path: the local file, or the
// uploaded snapshot when it is further, by pickBase's rule (decide.go).
func (s *Service) chooseBase(ctx context.Context, cc *ContextConfig, n int, path string, prevEpoch, wrote int64) (baseChoice, error) {
	var local *sqlite.BackupInfo
	if _, err := os.Stat(path); err == nil {
		info, err := sqlite.Inspect(ctx, path)
		if err != nil {
			return baseChoice{}, err
		}
		local = &info
	}
	snap, ok, err := s.owner.store.SnapshotInfo(ctx, cc.Name, n)
	if err != nil {
		return baseChoice{}, err
	}
	var uploaded *cluster.Snapshot
	if ok {
		uploaded = &snap
	}
	choice, download := pickBase(local, uploaded, prevEpoch, wrote) // decide.go
	if download {
		tmp := path + ".download"
		_ = os.Remove(tmp)
		// The copy pickBase chose from, not whatever is newest by now.
		if err := s.owner.store.GetSnapshot(ctx, snap, tmp); err != nil {
			return baseChoice{}, err
		}
		if err := sqlite.CheckIntegrity(ctx, tmp); err != nil {
			_ = os.Remove(tmp)
			return baseChoice{}, fmt.Errorf("shardnode: the uploaded snapshot of shard %d is damaged: %w", n, err)
		}
		// A snapshot uploaded before copies lost the mark still
		// carries its writer's: in place, after a take that fails,
		// it would be trusted whole (sqlite.UnmarkWhole).
		if err := sqlite.UnmarkWhole(ctx, tmp); err != nil {
			_ = os.Remove(tmp)
			return baseChoice{}, err
		}
		for _, suffix := range []string{"-wal", "-shm", ""} {
			if err := os.Remove(path + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
				return baseChoice{}, err
			}
		}
		if err := os.Rename(tmp, path); err != nil {
			return baseChoice{}, err
		}
	}
	return choice, nil
}

// highestEpoch is the newest epoch any copy of the shard carries.
func (s *Service) highestEpoch(ctx context.Context, cc *ContextConfig, n int) int64 {
	var e int64
	if info, err := sqlite.Inspect(ctx, shardPath(s.cfg.DataDir, cc.Name, n)); err == nil {
		e = info.Epoch
	}
	if snap, ok, err := s.owner.store.SnapshotInfo(ctx, cc.Name, n); err == nil && ok {
		e = max(e, snap.Epoch)
	}
	return e
}

// lastStreamSeqUnknown asks the catch-up to start at the subject's current
// end: nothing in the stream is missing from the file.
const lastStreamSeqUnknown = ^uint64(0)
