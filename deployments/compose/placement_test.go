//go:build docker

package compose

import (
	"fmt"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
)

// owners maps each shard to its owner, "" for a shard between owners.
func owners(st *kuma.StatusReply) map[int]string {
	m := map[int]string{}
	for _, s := range st.Shards {
		m[s.Shard] = s.Owner
	}
	return m
}

// settled says why the cluster is not settled: every shard owned by a live
// node where it should be, nothing moving, want nodes.
func settled(st *kuma.StatusReply, wantNodes int) string {
	if len(st.Nodes) != wantNodes {
		return fmt.Sprintf("%d nodes, want %d", len(st.Nodes), wantNodes)
	}
	if len(st.Shards) != shards {
		return fmt.Sprintf("%d shards in the map, want %d", len(st.Shards), shards)
	}
	for _, s := range st.Shards {
		if s.Owner == "" || s.Owner != s.Desired || s.Moving != "" {
			return fmt.Sprintf("shard %d: owner %q, desired %q, moving %q", s.Shard, s.Owner, s.Desired, s.Moving)
		}
	}
	return ""
}

// waitSettled waits until status shows nodes members and every shard
// settled (see settled), and returns that status and how long it took.
func waitSettled(t testing.TB, status func() (*kuma.StatusReply, string), what string, nodes int) (*kuma.StatusReply, time.Duration) {
	t.Helper()
	var st *kuma.StatusReply
	took := waitFor(t, what, 3*time.Minute, func() string {
		var why string
		if st, why = status(); why != "" {
			return why
		}
		return settled(st, nodes)
	})
	return st, took
}

// placed is how many shards rendezvous hashing gives each member of st
// (no operator pins in these tests).
func placed(st *kuma.StatusReply) map[string]int {
	var names []string
	for _, n := range st.Nodes {
		names = append(names, n.Name)
	}
	m := map[string]int{}
	for _, n := range names {
		m[n] = 0
	}
	for s := range shards {
		m[cluster.Rendezvous(kuma.DefaultContext, s, names)]++
	}
	return m
}

func nodeShards(st *kuma.StatusReply) map[string]int {
	m := map[string]int{}
	for _, n := range st.Nodes {
		m[n.Name] = n.Shards
	}
	return m
}
