package shardnode

import (
	"fmt"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/sqlite"
)

func TestTakeFrom(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	const ttl = 6 * time.Second
	fresh, stale := now.Add(-time.Second), now.Add(-time.Minute)
	alive := func(live ...string) func(string) bool {
		return func(n string) bool {
			for _, l := range live {
				if l == n {
					return true
				}
			}
			return false
		}
	}
	for _, tc := range []struct {
		name  string
		want  string // where placement puts the shard
		lease *cluster.Lease
		alive func(string) bool
		take  bool
		prev  bool // takes the lease over (else a first lease)
		what  string
	}{
		{"never leased, placed here", "me", nil, alive("me"), true, false, "taking over"},
		{"never leased, placed elsewhere", "b", nil, alive("me", "b"), false, false, ""},
		{"released, placed here", "me", &cluster.Lease{Epoch: 3}, alive("me"), true, true, "taking over"},
		{"handed to this node, placed elsewhere since", "b", &cluster.Lease{Epoch: 3, HandoffTo: "me"}, alive("me", "b"), true, true, "taking over"},
		{"released, placed elsewhere", "b", &cluster.Lease{Epoch: 3, HandoffTo: "b"}, alive("me", "b"), false, false, ""},
		{"own lease from before a restart, placed elsewhere", "b", &cluster.Lease{Owner: "me", Epoch: 3, Renewed: fresh}, alive("me", "b"), true, true, "taking over"},
		{"held by a live node", "me", &cluster.Lease{Owner: "b", Epoch: 3, Renewed: stale}, alive("me", "b"), false, false, ""},
		{"held by a dead node, lease still running", "me", &cluster.Lease{Owner: "b", Epoch: 3, Renewed: fresh}, alive("me"), false, false, ""},
		{"held by a dead node, lease run out", "me", &cluster.Lease{Owner: "b", Epoch: 3, Renewed: stale}, alive("me"), true, true, "failing over from b"},
		{"dead owner, placed on a third node", "c", &cluster.Lease{Owner: "b", Epoch: 3, Renewed: stale}, alive("me", "c"), false, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var lease cluster.Lease
			if tc.lease != nil {
				lease = *tc.lease
			}
			prev, what, take := takeFrom("me", tc.want, lease, tc.lease != nil, now, ttl, tc.alive)
			if take != tc.take || (prev != nil) != tc.prev || what != tc.what {
				t.Fatalf("got take %v, prev %+v, %q; want take %v, prev %v, %q", take, prev, what, tc.take, tc.prev, tc.what)
			}
			if prev != nil && *prev != lease {
				t.Fatalf("prev: got %+v, want the shard's lease %+v", *prev, lease)
			}
		})
	}
}

func TestHandOffTo(t *testing.T) {
	live := func(n string) bool { return n != "dead" }
	const minHold = 3 * time.Second
	for _, tc := range []struct {
		want string
		held time.Duration
		ok   bool
	}{
		{"", time.Minute, false},     // placed nowhere (no live member wants it)
		{"me", time.Minute, false},   // where it should be
		{"dead", time.Minute, false}, // placement's view is behind
		{"b", minHold, false},        // just taken: not bounced back at once
		{"b", minHold + 1, true},
	} {
		if got := handOffTo("me", tc.want, live, tc.held, minHold); got != tc.ok {
			t.Errorf("hand off to %q after %v: got %v, want %v", tc.want, tc.held, got, tc.ok)
		}
	}
}

func TestTrustedEpochs(t *testing.T) {
	for _, tc := range []struct {
		name             string
		prev             *cluster.Lease
		epoch, lastWrote int64
	}{
		{"never leased: any copy", nil, 0, 0},
		{"the last owner served", &cluster.Lease{Epoch: 5, Serving: true}, 5, 5},
		{"the last take failed before serving", &cluster.Lease{Epoch: 6, Wrote: 5}, -6, 5},
	} {
		e, w := trustedEpochs(tc.prev)
		if e != tc.epoch || w != tc.lastWrote {
			t.Errorf("%s: got epoch %d, wrote %d; want %d, %d", tc.name, e, w, tc.epoch, tc.lastWrote)
		}
	}
}

func TestPickBase(t *testing.T) {
	const unknown = lastStreamSeqUnknown
	for _, tc := range []struct {
		name             string
		local            *sqlite.BackupInfo
		snap             *cluster.Snapshot
		prevEpoch, wrote int64
		want             baseChoice
		download         bool
	}{
		{"no copy at all", nil, nil, 0, 0, baseChoice{}, false},
		{"a file nobody else ever owned", &sqlite.BackupInfo{Epoch: 1, LastSeq: 10, Published: 7}, nil, 0, 0,
			baseChoice{trusted: 10, fromStreamSeq: unknown}, false},
		{"the last owner's own file", &sqlite.BackupInfo{Epoch: 5, LastSeq: 10, Published: 7}, nil, 5, 5,
			baseChoice{trusted: 10, fromStreamSeq: unknown}, false},
		{"an older owner's file: only what it knew published", &sqlite.BackupInfo{Epoch: 3, LastSeq: 10, Published: 7}, nil, 5, 5,
			baseChoice{trusted: 7, truncate: true}, false},
		{"an older epoch's file marked whole as of the last that served", &sqlite.BackupInfo{Epoch: 3, WholeOf: 5, LastSeq: 10, Published: 7}, nil, -6, 5,
			baseChoice{trusted: 10, fromStreamSeq: unknown}, false},
		{"a failed take's file is not whole", &sqlite.BackupInfo{Epoch: 6, WholeOf: 4, LastSeq: 10, Published: 7}, nil, -6, 5,
			baseChoice{trusted: 7, truncate: true}, false},
		{"the last owner's snapshot beats an older file", &sqlite.BackupInfo{Epoch: 3, LastSeq: 10, Published: 7},
			&cluster.Snapshot{Epoch: 5, LastSeq: 12, Published: 11, StreamSeq: 40}, 5, 5,
			baseChoice{trusted: 12, fromStreamSeq: 40}, true},
		{"an older snapshot trusted to its published position, behind the file", &sqlite.BackupInfo{Epoch: 3, LastSeq: 10, Published: 7},
			&cluster.Snapshot{Epoch: 4, LastSeq: 12, Published: 6, StreamSeq: 40}, 5, 5,
			baseChoice{trusted: 7, truncate: true}, false},
		{"no file: the snapshot, cut to what was published", nil,
			&cluster.Snapshot{Epoch: 4, LastSeq: 9, Published: 6, StreamSeq: 30}, 5, 5,
			baseChoice{trusted: 6, truncate: true, fromStreamSeq: 30}, true},
		{"a whole file as far as the snapshot keeps the file", &sqlite.BackupInfo{Epoch: 5, LastSeq: 12, Published: 9},
			&cluster.Snapshot{Epoch: 5, LastSeq: 12, Published: 12, StreamSeq: 40}, 5, 5,
			baseChoice{trusted: 12, fromStreamSeq: unknown}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, download := pickBase(tc.local, tc.snap, tc.prevEpoch, tc.wrote)
			if got != tc.want || download != tc.download {
				t.Fatalf("got %s, download %v; want %s, download %v", fmtChoice(got), download, fmtChoice(tc.want), tc.download)
			}
		})
	}
}

func fmtChoice(c baseChoice) string {
	from := fmt.Sprint(c.fromStreamSeq)
	if c.fromStreamSeq == lastStreamSeqUnknown {
		from = "the end"
	}
	return fmt.Sprintf("{trusted %d, truncate %v, catch up from %s}", c.trusted, c.truncate, from)
}
