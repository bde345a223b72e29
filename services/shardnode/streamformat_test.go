package shardnode

import (
	"log/slog"
	"testing"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestStreamFormatGate: relays write format 2 only while every live member
// and every projector durable reads it; a member or durable from before
// format 2 (no formats advertised) holds them at format 1.
func TestStreamFormatGate(t *testing.T) {
	reads2 := cluster.Member{Node: "new", StreamFormats: kuma.StreamFormats}
	old := cluster.Member{Node: "old"}
	only1 := cluster.Member{Node: "one", StreamFormats: []int{1}}
	durable := func(formats string) map[string]string {
		md := map[string]string{kuma.ConsumerMetaNode: "n", "kuma_projection": "p"}
		if formats != "" {
			md[kuma.ConsumerMetaStreamFormats] = formats
		}
		return md
	}
	for _, tc := range []struct {
		name     string
		members  []cluster.Member
		durables []map[string]string
		want     int
	}{
		{"a node alone, no projector yet", []cluster.Member{reads2}, nil, 2},
		{"every member and durable reads 2", []cluster.Member{reads2, reads2}, []map[string]string{durable("1,2")}, 2},
		{"a member from before format 2", []cluster.Member{reads2, old}, nil, 1},
		{"a member that reads format 1 only", []cluster.Member{only1, reads2}, nil, 1},
		{"a projector durable from before format 2", []cluster.Member{reads2}, []map[string]string{durable("1,2"), durable("")}, 1},
		{"a durable that is not a projector's", []cluster.Member{reads2}, []map[string]string{{"other": "x"}, nil}, 2},
		{"a durable of formats 1 and 3", []cluster.Member{reads2}, []map[string]string{durable("1,3")}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g formatGate
			if got := g.streamFormat(); got != kuma.StreamFormat1 {
				t.Fatalf("before any look: format %d, want 1", got)
			}
			m, d := membersReadFormat2(tc.members), durablesReadFormat2(tc.durables)
			g.set(discard(), &m, &d)
			if got := g.streamFormat(); got != tc.want {
				t.Errorf("format %d, want %d", got, tc.want)
			}
		})
	}
	// The old member leaves: format 2 from the next look on; it comes back: 1.
	var g formatGate
	yes, no := true, false
	g.set(discard(), &no, &yes)
	g.set(discard(), &yes, nil)
	if got := g.streamFormat(); got != 2 {
		t.Errorf("once the old member left: format %d, want 2", got)
	}
	g.set(discard(), &no, nil)
	if got := g.streamFormat(); got != 1 {
		t.Errorf("once an old member came back: format %d, want 1", got)
	}
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }
