// Package placement maps entities to shards. The mapping is static for a
// context's lifetime (xxhash of the entity id modulo the shard count): moving
// load between nodes moves whole shards, never single entities.
package placement

import "github.com/cespare/xxhash/v2"

// ShardOf returns the shard, in [0, shards), that owns entity. Routers, the Go
// client's direct routing and the shardnode's own check all call this one
// function, so they can never disagree.
func ShardOf(entity string, shards int) int {
	return int(xxhash.Sum64String(entity) % uint64(shards))
}
