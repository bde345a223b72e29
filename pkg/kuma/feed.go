package kuma

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"strconv"
	"time"
)

// FeedSubject is where a context's feed answers: kuma.<ctx>.feed.
func FeedSubject(ctx string) string { return PublicPrefix + "." + ctx + ".feed" }

// ShardFeedSubject is where a shard's owner answers for its part of the feed
// (internal): _kuma.<ctx>.shard.<n>.feed.
func ShardFeedSubject(ctx string, shard int) string { return ShardPrefix(ctx, shard) + "feed" }

// Feed limits (PROTOCOL.md, feed).
const (
	DefaultFeedLimit = 100
	MaxFeedLimit     = 1000
	MaxFeedWait      = 30000 // ms
	// MaxFeedTypes bounds the types filter, so that a request cannot make
	// every event's check long.
	MaxFeedTypes = 100
	// FeedEnd is the cursor that starts at the current end of every shard.
	FeedEnd = "end"
)

// FeedRequest is the body of kuma.<ctx>.feed.
type FeedRequest struct {
	After  string   `json:"after,omitempty"`
	Limit  int      `json:"limit,omitempty"`
	WaitMS int      `json:"wait_ms,omitempty"`
	Prefix string   `json:"prefix,omitempty"`
	Types  []string `json:"types,omitempty"`
}

func (*FeedRequest) fields() fieldSet {
	return fieldSet{top: []string{"after", "limit", "wait_ms", "prefix", "types"},
		nonZero: map[string]string{"limit": "limit must be 1 to " + strconv.Itoa(MaxFeedLimit) + ", got 0 (leave it out for the default, " + strconv.Itoa(DefaultFeedLimit) + ")"}}
}

// Validate checks the filters and limits and fills the default limit. The
// cursor is checked by DecodeFeedCursor, which needs the context.
func (r *FeedRequest) Validate() error {
	switch {
	case r.Limit == 0:
		r.Limit = DefaultFeedLimit
	case r.Limit < 0 || r.Limit > MaxFeedLimit:
		return Errorf(CodeBadRequest, "limit must be 1 to %d, got %d", MaxFeedLimit, r.Limit)
	}
	if r.WaitMS < 0 || r.WaitMS > MaxFeedWait {
		return Errorf(CodeBadRequest, "wait_ms must be 0 to %d, got %d", MaxFeedWait, r.WaitMS)
	}
	if r.Prefix != "" {
		// A prefix is the start of an entity id: the same characters.
		if err := ValidateEntityID(r.Prefix); err != nil {
			return Errorf(CodeBadRequest, "prefix %q is not the start of an entity id: it must match ^[A-Za-z0-9][A-Za-z0-9_:=@-]{0,127}$", truncate(r.Prefix))
		}
	}
	if len(r.Types) > MaxFeedTypes {
		return Errorf(CodeBadRequest, "types may name at most %d event types, got %d", MaxFeedTypes, len(r.Types))
	}
	for _, t := range r.Types {
		if err := ValidateEventType(t); err != nil {
			return Errorf(CodeBadRequest, "types: %s", AsError(err).Message)
		}
	}
	return nil
}

// FeedEvent is one event of a feed page, opened.
type FeedEvent struct {
	Entity   string          `json:"entity"`
	Version  int64           `json:"version"`
	Type     string          `json:"type"`
	Data     json.RawMessage `json:"data"`
	Time     time.Time       `json:"time"`
	Position string          `json:"position"`
}

// FeedReply answers a feed request. Next is the cursor to send as after for
// the following page; with no events it is the request's own cursor (or the
// current end for "end").
type FeedReply struct {
	Events []FeedEvent `json:"events"`
	Next   string      `json:"next"`
}

// ShardFeedRequest asks one shard's owner for its events after position
// After (internal: the router assembles pages from these).
type ShardFeedRequest struct {
	After    int64    `json:"after"`
	Limit    int      `json:"limit"`
	MaxBytes int      `json:"max_bytes"`
	WaitMS   int      `json:"wait_ms,omitempty"`
	Prefix   string   `json:"prefix,omitempty"`
	Types    []string `json:"types,omitempty"`
	// End asks only for the shard's current end (the "end" cursor).
	End bool `json:"end,omitempty"`
}

func (*ShardFeedRequest) fields() fieldSet {
	return fieldSet{top: []string{"after", "limit", "max_bytes", "wait_ms", "prefix", "types", "end"}}
}

// ShardFeedPage is one shard's part of a page: its events after the
// requested position in commit order, each already encoded as the JSON it
// is in the client's page, and Next, the position it read up to (past
// events the filters skipped). Next is never beyond what the shard has
// published to the stream: the feed shows only what a consumer of the
// stream could also see, so a failover never takes back an event a client
// was shown. It crosses the wire in a framed binary form (MarshalBinary)
// that the router merges without decoding any event.
type ShardFeedPage struct {
	Next   int64
	Events []ShardFeedEvent
}

// ShardFeedEvent is one encoded event of a shard's part, with what the
// router needs to merge and cut: its commit time and position.
type ShardFeedEvent struct {
	Time int64 // unix nanoseconds
	Seq  int64
	JSON []byte // the FeedEvent as JSON
}

const shardFeedMagic = "KF1"

// MarshalBinary frames the page: a magic, Next, the count, then per event
// its time, position and length (varints) and its JSON.
func (p *ShardFeedPage) MarshalBinary() ([]byte, error) {
	n := len(shardFeedMagic) + 20
	for _, e := range p.Events {
		n += 30 + len(e.JSON)
	}
	b := make([]byte, 0, n)
	b = append(b, shardFeedMagic...)
	b = binary.AppendUvarint(b, uint64(p.Next))
	b = binary.AppendUvarint(b, uint64(len(p.Events)))
	for _, e := range p.Events {
		b = binary.AppendUvarint(b, uint64(e.Time))
		b = binary.AppendUvarint(b, uint64(e.Seq))
		b = binary.AppendUvarint(b, uint64(len(e.JSON)))
		b = append(b, e.JSON...)
	}
	return b, nil
}

// UnmarshalBinary reads a framed page; the events' JSON slices alias b.
func (p *ShardFeedPage) UnmarshalBinary(b []byte) error {
	bad := errors.New("kuma: malformed shard feed page")
	rest, ok := bytes.CutPrefix(b, []byte(shardFeedMagic))
	if !ok {
		return bad
	}
	uv := func() (uint64, bool) {
		v, k := binary.Uvarint(rest)
		if k <= 0 {
			return 0, false
		}
		rest = rest[k:]
		return v, true
	}
	next, ok1 := uv()
	count, ok2 := uv()
	if !ok1 || !ok2 || count > uint64(len(rest)) {
		return bad
	}
	p.Next = int64(next)
	p.Events = make([]ShardFeedEvent, count)
	for i := range p.Events {
		t, ok1 := uv()
		seq, ok2 := uv()
		n, ok3 := uv()
		if !ok1 || !ok2 || !ok3 || n > uint64(len(rest)) {
			return bad
		}
		p.Events[i] = ShardFeedEvent{Time: int64(t), Seq: int64(seq), JSON: rest[:n:n]}
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return bad
	}
	return nil
}

// AppendFeedEventJSON appends e as JSON, the same bytes json.Marshal makes
// of it for compact data, without its reflection and its re-validation of
// Data: the entity id, the type and the position are of character sets that
// need no escaping (the naming rules), and Data is JSON that was validated
// when it was appended.
func AppendFeedEventJSON(b []byte, e *FeedEvent) []byte {
	b = append(b, `{"entity":"`...)
	b = append(b, e.Entity...)
	b = append(b, `","version":`...)
	b = strconv.AppendInt(b, e.Version, 10)
	b = append(b, `,"type":"`...)
	b = append(b, e.Type...)
	b = append(b, `","data":`...)
	if len(e.Data) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, e.Data...)
	}
	b = append(b, `,"time":"`...)
	b = e.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","position":"`...)
	b = append(b, e.Position...)
	return append(b, `"}`...)
}

// FeedCursor is a position per shard of one context: the feed's checkpoint.
// Its string form is opaque to clients.
type FeedCursor struct {
	Context string
	After   []int64 // indexed by shard
}

const feedCursorPrefix = "f1."

// String encodes the cursor: "f1." then base64url of the context name, the
// shard count, each shard's position (varints) and a CRC-32 of all that, so
// a mistyped or truncated cursor is refused rather than read as another.
func (c FeedCursor) String() string {
	b := make([]byte, 0, 8+len(c.Context)+len(c.After)*3)
	b = binary.AppendUvarint(b, uint64(len(c.Context)))
	b = append(b, c.Context...)
	b = binary.AppendUvarint(b, uint64(len(c.After)))
	for _, p := range c.After {
		b = binary.AppendUvarint(b, uint64(p))
	}
	b = binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
	return feedCursorPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// DecodeFeedCursor reads a cursor for context ctx with shards shards. The
// empty cursor is the start of every shard; a cursor of another context or
// shard count, or one that does not decode, is bad_request.
func DecodeFeedCursor(s, ctx string, shards int) (FeedCursor, error) {
	if s == "" {
		return FeedCursor{Context: ctx, After: make([]int64, shards)}, nil
	}
	return decodeFeedCursor(s, ctx, shards)
}

// ParseFeedCursor reads a cursor of context ctx made by String, whatever
// its shard count (which it tells: len(After)).
func ParseFeedCursor(s, ctx string) (FeedCursor, error) {
	return decodeFeedCursor(s, ctx, -1)
}

// decodeFeedCursor reads a cursor; shards < 0 takes the count it holds.
func decodeFeedCursor(s, ctx string, shards int) (FeedCursor, error) {
	c := FeedCursor{Context: ctx}
	bad := func(why string) (FeedCursor, error) {
		return FeedCursor{}, Errorf(CodeBadRequest, "after %q is not a feed cursor of context %q: %s (send a cursor from an earlier reply's next, \"end\", or none to start from the first event)", truncate(s), ctx, why)
	}
	rest, ok := cutPrefix(s, feedCursorPrefix)
	if !ok {
		return bad("it does not start with " + feedCursorPrefix)
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(rest) // one spelling per cursor
	if err != nil || len(b) < 4 {
		return bad("it does not decode")
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return bad("its checksum does not match (was it cut or edited?)")
	}
	n, k := binary.Uvarint(body)
	if k <= 0 || n > uint64(len(body)-k) {
		return bad("it does not decode")
	}
	body = body[k:]
	if got := string(body[:n]); got != ctx {
		return bad("it belongs to context " + truncate(got))
	}
	body = body[n:]
	count, k := binary.Uvarint(body)
	if k <= 0 {
		return bad("it does not decode")
	}
	if shards >= 0 && count != uint64(shards) {
		return bad("it was made for another shard count")
	}
	if count > uint64(len(body)) { // each position takes a byte at least
		return bad("it does not decode")
	}
	c.After = make([]int64, count)
	body = body[k:]
	for i := range c.After {
		p, k := binary.Uvarint(body)
		if k <= 0 || p > 1<<62 {
			return bad("it does not decode")
		}
		c.After[i] = int64(p)
		body = body[k:]
	}
	if len(body) != 0 {
		return bad("it has data past its end")
	}
	return c, nil
}

func cutPrefix(s, p string) (string, bool) {
	if len(s) < len(p) || s[:len(p)] != p {
		return s, false
	}
	return s[len(p):], true
}
