package placement

import (
	"fmt"
	"testing"
)

func TestShardOfIsStableAndSpread(t *testing.T) {
	// Pinned values: if these change, every existing data dir and every
	// client that routes by itself breaks.
	pinned := []struct {
		id           string
		shards, want int
	}{
		{"user_0x9A4F", 16, 14}, {"a", 16, 11}, {"order-7731", 16, 15}, {"sensor:42", 16, 2},
		{"user_0x9A4F", 7, 2}, {"a", 7, 6},
	}
	for _, p := range pinned {
		if got := ShardOf(p.id, p.shards); got != p.want {
			t.Errorf("ShardOf(%q, %d) = %d, want %d", p.id, p.shards, got, p.want)
		}
	}
	counts := make([]int, 16)
	for i := 0; i < 16000; i++ {
		counts[ShardOf(fmt.Sprintf("user-%d", i), 16)]++
	}
	for s, n := range counts {
		if n < 800 || n > 1200 {
			t.Errorf("shard %d got %d of 16000 entities, want about 1000", s, n)
		}
	}
}
