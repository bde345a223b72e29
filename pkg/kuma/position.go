package kuma

import (
	"strconv"
	"strings"
)

// Position is where an event sits in its shard's commit order: the shard and
// the event's sequence number within it (1, 2, 3... with no gaps). Positions of
// one shard are totally ordered; positions of different shards are not
// comparable. Clients treat the string form as an opaque token.
type Position struct {
	Shard int
	Seq   int64
}

const positionPrefix = "p1."

// String is the opaque token form, e.g. "p1.3.1042".
func (p Position) String() string {
	return positionPrefix + strconv.Itoa(p.Shard) + "." + strconv.FormatInt(p.Seq, 10)
}

// ParsePosition parses a token made by Position.String.
func ParsePosition(s string) (Position, error) {
	rest, ok := strings.CutPrefix(s, positionPrefix)
	if !ok {
		return Position{}, Errorf(CodeBadRequest, "position %q is not a Kuma position token", truncate(s))
	}
	sh, seq, ok := strings.Cut(rest, ".")
	shard, err1 := strconv.Atoi(sh)
	n, err2 := strconv.ParseInt(seq, 10, 64)
	p := Position{Shard: shard, Seq: n}
	// Only the canonical spelling is a token, so equal positions are equal strings.
	if !ok || err1 != nil || err2 != nil || shard < 0 || n < 1 || p.String() != s {
		return Position{}, Errorf(CodeBadRequest, "position %q is not a Kuma position token", truncate(s))
	}
	return p, nil
}
