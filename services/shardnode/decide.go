package shardnode

import (
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// The owner's decisions, as functions of plain values: what the control
// loop and a take read from the buckets and the files goes in, what to do
// comes out. The owner (owner.go, moves.go) and openOwned (open.go) do the
// I/O around them.

// takeFrom decides whether this node (me) takes a shard it does not serve.
// lease is the shard's lease (leased: it has one), want the node placement
// puts the shard on, and alive tells a live member. It returns the lease
// to take over (nil for a shard never leased) and what the move is called.
func takeFrom(me, want string, lease cluster.Lease, leased bool, now time.Time, ttl time.Duration,
	alive func(node string) bool) (prev *cluster.Lease, what string, take bool) {
	switch {
	case !leased:
		if want != me {
			return nil, "", false
		}
	case lease.Owner == "" && (want == me || lease.HandoffTo == me):
		prev = &lease
	case lease.Owner == me:
		// Our own earlier incarnation (a restart): no need to wait for
		// the lease to run out. Taken back even when the shard should
		// live elsewhere now (a kill in the middle of its hand-off):
		// nobody else takes a lease whose owner is alive, and only
		// this node's file may hold its last commits. The next
		// reconcile hands it on as usual.
		prev = &lease
	case lease.Owner != "" && lease.Owner != me && want == me &&
		lease.Expired(now, ttl) && !alive(lease.Owner):
		prev = &lease // failover
	default:
		return nil, "", false
	}
	what = "taking over"
	if prev != nil && prev.Owner != "" && prev.Owner != me {
		what = "failing over from " + prev.Owner
	}
	return prev, what, true
}

// handOffTo decides whether a shard this node (me) has held for held
// should go to want, where placement puts it: to a live member, and not
// before minHold, so that views that disagree for a moment do not bounce
// it between two nodes.
func handOffTo(me, want string, alive func(node string) bool, held, minHold time.Duration) bool {
	return want != "" && want != me && alive(want) && held > minHold
}

// trustedEpochs says which copies of a shard openOwned may trust whole,
// given the lease before this one (nil: the shard was never leased):
// prevEpoch is the epoch a copy must carry (0: any, nobody else ever owned
// it), and wrote the last epoch that served.
//
// A copy written under the previous epoch holds that owner's whole
// history only if the owner got as far as serving (it marks its lease
// Serving once caught up): a taker that failed half-way through its
// catch-up leaves a file stamped with its epoch but short of the stream.
// A copy marked whole as of the last epoch that served, or later, is
// whole too, whatever takes failed since (they wrote nothing).
func trustedEpochs(prev *cluster.Lease) (prevEpoch, wrote int64) {
	if prev == nil {
		return 0, 0
	}
	prevEpoch, wrote = prev.Epoch, prev.LastServed()
	if !prev.Serving {
		prevEpoch = -prev.Epoch // matches no copy's epoch
	}
	return prevEpoch, wrote
}

// pickBase is chooseBase's rule, on what the copies say of themselves:
// the local file (nil: none) and the uploaded snapshot (nil: none). A copy
// written under prevEpoch is the latest owner's own and trusted whole, and
// so is a local file marked whole as of wrote or later; any other copy
// only up to what it knew was published, since another owner may have
// written different events after that. download says the snapshot is the
// further copy, and the choice is then the snapshot's.
func pickBase(local *sqlite.BackupInfo, snap *cluster.Snapshot, prevEpoch, wrote int64) (choice baseChoice, download bool) {
	// With no lease before this one, nobody else has ever owned the shard.
	whole := func(epoch int64) bool { return prevEpoch == 0 || epoch == prevEpoch }
	if local != nil {
		wholeFile := whole(local.Epoch) || wrote > 0 && local.WholeOf >= wrote
		choice.trusted = local.Published
		if wholeFile {
			choice.trusted = local.LastSeq
		}
		choice.truncate = choice.trusted < local.LastSeq
		if wholeFile {
			// The last owner was this file's writer: the stream holds
			// nothing it lacks; the catch-up only reads to the end.
			choice.fromStreamSeq = lastStreamSeqUnknown
		}
	}
	if snap != nil {
		st := snap.LastSeq
		if !whole(snap.Epoch) {
			st = snap.Published
		}
		if local == nil || st > choice.trusted {
			return baseChoice{trusted: st, truncate: st < snap.LastSeq, fromStreamSeq: snap.StreamSeq}, true
		}
	}
	return choice, false
}
