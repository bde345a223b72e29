package kuma

import (
	"strconv"
	"strings"
)

// Operations addressed to one entity.
const (
	OpAppend  = "append"
	OpRead    = "read"
	OpHistory = "history"
	OpExport  = "export"
	OpForget  = "forget"
)

// EntityOps lists the operations routed to an entity's shard.
var EntityOps = []string{OpAppend, OpRead, OpHistory, OpExport, OpForget}

// PublicPrefix is the root of every public subject; a client given
// kuma.<ctx>.> may reach all of its context and nothing else.
const PublicPrefix = "kuma"

// InternalPrefix roots the shard subjects. It sits outside kuma.> so that NATS
// permissions can keep clients off them.
const InternalPrefix = "_kuma"

// EntitySubject is the public subject of an entity operation:
// kuma.<ctx>.<op>.<entity>.
func EntitySubject(ctx, op, entity string) string {
	return PublicPrefix + "." + ctx + "." + op + "." + entity
}

// ShardSubject is the internal subject a shard's owner listens on:
// _kuma.<ctx>.shard.<n>.<op>.<entity>.
func ShardSubject(ctx string, shard int, op, entity string) string {
	return ShardPrefix(ctx, shard) + op + "." + entity
}

// ShardPrefix is "_kuma.<ctx>.shard.<n>." the prefix of all of a shard's subjects.
func ShardPrefix(ctx string, shard int) string {
	return InternalPrefix + "." + ctx + ".shard." + strconv.Itoa(shard) + "."
}

// ShardCountSubject is where a shardnode of ctx tells the context's shard
// count, to routers started without one: _kuma.<ctx>.shard.count. (A
// shard's own subjects have a number where "count" is.)
func ShardCountSubject(ctx string) string { return InternalPrefix + "." + ctx + ".shard.count" }

// ShardCountReply answers ShardCountSubject.
type ShardCountReply struct {
	Shards int `json:"shards"`
}

// ParseEntitySubject splits kuma.<ctx>.<op>.<entity>.
func ParseEntitySubject(subject string) (ctx, op, entity string, ok bool) {
	parts := strings.Split(subject, ".")
	if len(parts) != 4 || parts[0] != PublicPrefix {
		return "", "", "", false
	}
	return parts[1], parts[2], parts[3], true
}

// ParseShardSubject splits _kuma.<ctx>.shard.<n>.<op>.<entity> into op and entity.
func ParseShardSubject(subject string) (op, entity string, ok bool) {
	parts := strings.Split(subject, ".")
	if len(parts) != 6 || parts[0] != InternalPrefix || parts[2] != "shard" {
		return "", "", false
	}
	return parts[4], parts[5], true
}

// EventsSubject is where a shard's committed events are published:
// kuma.<ctx>.events.<shard>.
func EventsSubject(ctx string, shard int) string {
	return PublicPrefix + "." + ctx + ".events." + strconv.Itoa(shard)
}

// ForgottenSubject is where a shard announces, in its context's stream, that
// an entity was forgotten: kuma.<ctx>.events.<shard>.forgotten. It sits
// beside the shard's events subject (the stream holds kuma.<ctx>.events.>), so
// a consumer of both sees the notice after the entity's published events.
func ForgottenSubject(ctx string, shard int) string {
	return EventsSubject(ctx, shard) + ".forgotten"
}

// EventsWildcard matches every events and forget-notice subject of a context.
func EventsWildcard(ctx string) string { return PublicPrefix + "." + ctx + ".events.>" }

// QuerySubject is where a projection answers queries: kuma.<ctx>.query.<name>.
func QuerySubject(ctx, projection string) string {
	return PublicPrefix + "." + ctx + ".query." + projection
}

// ProjectionAdminSubject is kuma.<ctx>.projection.<op>.<name>, with op one
// of rebuild, retry and skip.
func ProjectionAdminSubject(ctx, op, projection string) string {
	return PublicPrefix + "." + ctx + ".projection." + op + "." + projection
}

// StatusSubject is kuma.<ctx>.status: the cluster's shards, nodes and
// moves, answered by any shardnode.
func StatusSubject(ctx string) string { return PublicPrefix + "." + ctx + ".status" }

// ProjectorStatusSubject is where projectors tell a shardnode's status
// answer about their projections (internal).
func ProjectorStatusSubject(ctx string) string {
	return InternalPrefix + "." + ctx + ".projector.status"
}

// ProjectorReplicasSubject is _kuma.<ctx>.projector.replicas.<op>, op one of
// rebuild, retry, skip and status: every projector replica of the context
// subscribes to it outside any queue group, so that the replica that
// received a public admin or status request reaches all of them (internal).
func ProjectorReplicasSubject(ctx, op string) string {
	return InternalPrefix + "." + ctx + ".projector.replicas." + op
}

// StreamName is the JetStream stream of a context's events.
func StreamName(ctx string) string { return "KUMA_" + ctx }

// ReplyAllowed reports whether Kuma may answer a request on its reply
// subject. A reply inside Kuma's own namespaces (kuma.>, _kuma.>) or NATS's
// ($JS, $KV, $SYS...) is refused: otherwise a client could make a service
// publish its answer into an event stream or call an API with it, using the
// service's rights instead of its own. No reply (a plain publish) is allowed:
// nothing is sent.
func ReplyAllowed(reply string) bool {
	for _, ns := range [...]string{PublicPrefix, InternalPrefix} {
		if reply == ns || strings.HasPrefix(reply, ns+".") {
			return false
		}
	}
	return !strings.HasPrefix(reply, "$")
}
