package shardnode

import (
	"strings"
	"testing"
)

// The one check of a shard count and of a durability, which the flags, the
// app's config and the shardnode's config share.
func TestValidateShardsAndDurability(t *testing.T) {
	for n, ok := range map[int]bool{1: true, 16: true, MaxShards: true, 0: false, -1: false, MaxShards + 1: false} {
		if err := ValidateShards(n); (err == nil) != ok || (err != nil && !strings.Contains(err.Error(), "shards must be 1 to 4096")) {
			t.Errorf("ValidateShards(%d) = %v", n, err)
		}
	}
	for d, ok := range map[string]bool{"": true, DurabilityLocal: true, DurabilityReplicated: true, "LOCAL": false, "sync": false} {
		if err := ValidateDurability(d); (err == nil) != ok || (err != nil && !strings.Contains(err.Error(), "durability must be local or replicated")) {
			t.Errorf("ValidateDurability(%q) = %v", d, err)
		}
	}
	cfg := Config{Contexts: []ContextConfig{{Name: "default", Shards: -1, Durability: "sync"}, {Name: "other", Shards: 0}}}
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), `context "default": shards must be`) || !strings.Contains(err.Error(), `context "default": durability must be`) {
		t.Fatalf("Validate of a context with -1 shards and durability sync = %v", err)
	}
	// 0 is the context's own count, filled in at Start.
	if strings.Contains(err.Error(), `context "other"`) {
		t.Fatalf("Validate refused a context with 0 shards (the context's own count): %v", err)
	}
}
