// Package shardnode owns shards: for each, one SQLite file with its
// group-commit writer, and one actor goroutine per live entity that is that
// entity's only writer. It answers the internal shard subjects
// _kuma.<ctx>.shard.<n>.<op>.<entity> that routers (and clients that route by
// themselves) send to.
//
// Its parts, each with the few dependencies it needs passed in and tests of
// its own (Temporal's history shard is the model):
//
//   - The entity actor (package entity): decoded requests in, results
//     out, no NATS. It is the entity's only writer.
//   - The shard (shard.go; what it needs of the node in sharddeps.go): its
//     store, its live actors and their passivation, its subscription
//     (endpoints.go), its relay, and what a shard does on its own: catch-up
//     (catchup.go), damaged files and full disks (corrupt.go), erasing a
//     forgotten entity (forget.go), its part of the feed (feed.go,
//     feedcache.go) and of a backup (backup.go).
//   - The relay (relay.go; relaydeps.go): the shard's outbox to the
//     context's stream, in order, once.
//   - The owner (owner.go; decisions as plain functions in decide.go,
//     moves in moves.go, opening in open.go): leases, hand-offs and
//     failovers.
//   - The node (service.go, stop.go, status.go, metrics.go): its contexts
//     and shards, its NATS micro endpoints, the stream format gate
//     (streamformat.go) and the stream's replica count (replicas.go).
package shardnode
