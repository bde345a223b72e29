package kuma

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// HeaderFormat names the format of a stream message's body: absent (or
// "1") for format 1, the JSON of StreamMessage; "2" for format 2, the
// binary layout of EncodeStreamMessage2. A reader decodes a body only by
// its header (DecodeStreamMessageFormat): a format-2 body read as JSON is
// no message at all, and a reader that does not know a format must stop
// rather than guess.
const HeaderFormat = "Kuma-Format"

// Stream message formats. A relay writes StreamFormat2 only once every
// process that may read the stream reads it (services/shardnode: the
// stream format gate).
const (
	StreamFormat1 = 1 // JSON (StreamMessage), no Kuma-Format header
	StreamFormat2 = 2 // binary runs, Kuma-Format: 2
)

// StreamFormats are the formats this build reads, for what a process
// advertises (cluster.Member.StreamFormats).
var StreamFormats = []int{StreamFormat1, StreamFormat2}

// ParseStreamFormat reads a Kuma-Format header: "" and "1" are format 1,
// "2" format 2; anything else is an error (a format this build does not
// know).
func ParseStreamFormat(h string) (int, error) {
	switch h {
	case "", "1":
		return StreamFormat1, nil
	case "2":
		return StreamFormat2, nil
	}
	return 0, fmt.Errorf("kuma: stream message of unknown format %q (header %s)", truncate(h), HeaderFormat)
}

// DecodeStreamMessageFormat decodes a stream message body of the given
// format (ParseStreamFormat of its Kuma-Format header). A format-2 body's
// payloads share data's memory: a reader that keeps them past data must
// copy them, and nobody may write to data while they are in use.
func DecodeStreamMessageFormat(format int, data []byte, m *StreamMessage) error {
	switch format {
	case StreamFormat1:
		return DecodeStreamMessage(data, m)
	case StreamFormat2:
		return decodeStream2(data, m)
	}
	return fmt.Errorf("kuma: stream message of unknown format %d", format)
}

// Format 2 (docs/protocol.md, "The event stream"). A relay's message is
// mostly runs: the events of one append are consecutive in position and
// version, of one entity, committed at one time, and only their sealed
// payloads differ. Format 1 repeated the 43-character pseudonym, the
// position, the RFC 3339 time and the payload's base64 for each event,
// about 470 bytes for a 200-byte event, and nats-server holds the last
// seconds of writes in its caches. Format 2 names those once per run and
// carries each payload raw, after its length:
//
//	0x02                           format
//	uvarint len, bytes             context
//	uvarint                        shard
//	then runs, to the end of the body:
//	  byte                         flags: 1 idempotency key, 2 first version
//	  uvarint len, bytes           pseudonym
//	  uvarint                      version of the run's first event
//	  uvarint                      position (sequence) of its first event
//	  zigzag varint                commit time, Unix nanoseconds
//	  uvarint                      n ≥ 1 events
//	  [flags&1] uvarint len, bytes idempotency key digest (the last event's)
//	  [flags&2] uvarint            first version of the append (the last event's)
//	  n × (uvarint len, bytes)     sealed payloads
//
// The run's events have versions v, v+1, ... and positions s, s+1, ... of
// the message's shard; the idempotency fields belong to its last event.
const stream2Version = 0x02

// Bounds of format 2's fields: a decoder refuses longer ones, so a garbled
// length never makes it allocate much (payloads are never copied).
const (
	stream2MaxName = 1024 // context, pseudonym, idempotency key
	stream2FlagKey = 1
	stream2FlagFV  = 2
)

var errStream2 = errors.New("kuma: malformed stream message (format 2)")

// EncodeStreamMessage2 appends m in format 2 to dst. Consecutive events of
// one pseudonym, consecutive versions and positions and one time make one
// run; an event with idempotency fields ends its run. It fails on what
// format 2 cannot carry: an event named by its id (Entity), a position not
// of m.Shard or not after the one before, a negative version, a time
// outside Unix nanoseconds. Times are decoded in UTC.
func EncodeStreamMessage2(dst []byte, m *StreamMessage) ([]byte, error) {
	if m.Shard < 0 || len(m.Context) > stream2MaxName {
		return dst, fmt.Errorf("kuma: stream message of context %q shard %d cannot be written in format 2", truncate(m.Context), m.Shard)
	}
	dst = append(dst, stream2Version)
	dst = appendString(dst, m.Context)
	dst = binary.AppendUvarint(dst, uint64(m.Shard))
	prefix := positionPrefix + strconv.Itoa(m.Shard) + "."
	evs := m.Events
	var lastSeq int64
	for len(evs) > 0 {
		first := &evs[0]
		seq, err := stream2Seq(first, m.Shard, prefix)
		if err != nil {
			return dst, err
		}
		if seq <= lastSeq {
			return dst, fmt.Errorf("kuma: event %s does not follow position %d: positions must increase", first.Position, lastSeq)
		}
		nanos := first.Time.UnixNano()
		if !time.Unix(0, nanos).Equal(first.Time) {
			return dst, fmt.Errorf("kuma: event %s: time %v cannot be written in format 2", first.Position, first.Time)
		}
		n := 1
		for ; n < len(evs); n++ {
			prev, e := &evs[n-1], &evs[n]
			if prev.IdempotencyKey != "" || prev.FirstVersion != 0 || e.Pseudonym != first.Pseudonym || e.Entity != "" ||
				e.Version != prev.Version+1 || !e.Time.Equal(first.Time) {
				break
			}
			if s, err := stream2Seq(e, m.Shard, prefix); err != nil || s != seq+int64(n) {
				break
			}
		}
		last := &evs[n-1]
		if first.Entity != "" || first.Pseudonym == "" || len(first.Pseudonym) > stream2MaxName || first.Version < 0 ||
			len(last.IdempotencyKey) > stream2MaxName || last.FirstVersion < 0 {
			return dst, fmt.Errorf("kuma: event %s cannot be written in format 2 (an entity named by its id, or a field out of range)", first.Position)
		}
		var flags byte
		if last.IdempotencyKey != "" {
			flags |= stream2FlagKey
		}
		if last.FirstVersion != 0 {
			flags |= stream2FlagFV
		}
		dst = append(dst, flags)
		dst = appendString(dst, first.Pseudonym)
		dst = binary.AppendUvarint(dst, uint64(first.Version))
		dst = binary.AppendUvarint(dst, uint64(seq))
		dst = binary.AppendVarint(dst, nanos)
		dst = binary.AppendUvarint(dst, uint64(n))
		if flags&stream2FlagKey != 0 {
			dst = appendString(dst, last.IdempotencyKey)
		}
		if flags&stream2FlagFV != 0 {
			dst = binary.AppendUvarint(dst, uint64(last.FirstVersion))
		}
		for i := range n {
			dst = binary.AppendUvarint(dst, uint64(len(evs[i].Payload)))
			dst = append(dst, evs[i].Payload...)
		}
		evs, lastSeq = evs[n:], seq+int64(n)-1
	}
	return dst, nil
}

// Stream2Size bounds the bytes an event adds to a format-2 message: its
// payload and length, and the header of a run it may start (with a
// pseudonym of up to 64 bytes: the keyvault's are 43). The message's
// context and shard come once, on top.
func Stream2Size(payload, idempotencyKey int) int {
	return payload + binary.MaxVarintLen32 + idempotencyKey + 3*binary.MaxVarintLen64 + 2*binary.MaxVarintLen16 + 64 + 1
}

// stream2Seq is the sequence of an event's position, which must be the
// canonical token of a position of the shard whose token prefix is
// "p1.<shard>." (ParsePosition's rule, without its allocations: the relay
// encodes every event).
func stream2Seq(e *StreamEvent, shard int, prefix string) (int64, error) {
	digits, ok := strings.CutPrefix(e.Position, prefix)
	if ok && len(digits) > 0 && len(digits) <= 19 && digits[0] != '0' {
		for i := 0; i < len(digits); i++ {
			if digits[i] < '0' || digits[i] > '9' {
				ok = false
				break
			}
		}
		if seq, err := strconv.ParseInt(digits, 10, 64); ok && err == nil {
			return seq, nil
		}
	}
	return 0, fmt.Errorf("kuma: event at %q is not of shard %d", truncate(e.Position), shard)
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// stream2Reader reads a format-2 body; every read past its end or out of
// bounds fails with errStream2.
type stream2Reader struct {
	b   []byte
	i   int
	err error
}

func (r *stream2Reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, w := binary.Uvarint(r.b[r.i:])
	if w <= 0 {
		r.err = errStream2
		return 0
	}
	r.i += w
	return v
}

func (r *stream2Reader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, w := binary.Varint(r.b[r.i:])
	if w <= 0 {
		r.err = errStream2
		return 0
	}
	r.i += w
	return v
}

// bytes reads a length and that many bytes (sharing r.b), at most max.
func (r *stream2Reader) bytes(max uint64) []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > max || n > uint64(len(r.b)-r.i) {
		r.err = errStream2
		return nil
	}
	s := r.b[r.i : r.i+int(n) : r.i+int(n)]
	r.i += int(n)
	return s
}

func (r *stream2Reader) byte() byte {
	if r.err != nil {
		return 0
	}
	if r.i >= len(r.b) {
		r.err = errStream2
		return 0
	}
	c := r.b[r.i]
	r.i++
	return c
}

// stream2Run is a run's header as read.
type stream2Run struct {
	flags        byte
	pseudonym    []byte
	version, seq int64
	nanos        int64
	n            int
	key          []byte
	firstVersion int64
}

func (r *stream2Reader) run() (h stream2Run) {
	h.flags = r.byte()
	if h.flags&^(stream2FlagKey|stream2FlagFV) != 0 {
		r.err = errStream2
	}
	h.pseudonym = r.bytes(stream2MaxName)
	v, s := r.uvarint(), r.uvarint()
	h.nanos = r.varint()
	n := r.uvarint()
	if h.flags&stream2FlagKey != 0 {
		h.key = r.bytes(stream2MaxName)
	}
	if h.flags&stream2FlagFV != 0 {
		fv := r.uvarint()
		if fv == 0 || fv > math.MaxInt64 {
			r.err = errStream2
		}
		h.firstVersion = int64(fv)
	}
	// Every event takes at least its length byte, so n is bounded by
	// what is left; versions and positions must not overflow.
	if r.err == nil && (len(h.pseudonym) == 0 || (h.flags&stream2FlagKey != 0 && len(h.key) == 0) ||
		n == 0 || n > uint64(len(r.b)-r.i) || s == 0 || v == 0 ||
		v > math.MaxInt64-(n-1) || s > math.MaxInt64-(n-1)) {
		r.err = errStream2
	}
	if r.err != nil {
		return stream2Run{}
	}
	h.version, h.seq, h.n = int64(v), int64(s), int(n)
	return h
}

// skipPayloads passes over n payloads.
func (r *stream2Reader) skipPayloads(n int) {
	for i := 0; i < n && r.err == nil; i++ {
		r.bytes(math.MaxInt)
	}
}

func decodeStream2(data []byte, m *StreamMessage) error {
	r := &stream2Reader{b: data}
	if r.byte() != stream2Version {
		return errStream2
	}
	ctx := r.bytes(stream2MaxName)
	shard := r.uvarint()
	if r.err != nil || shard > math.MaxInt32 {
		return errStream2
	}
	body := r.i
	// The first pass checks the whole body and counts, so the second
	// allocates the events and the positions' text once.
	events, posBytes := 0, 0
	prefix := len(positionPrefix) + len(strconv.Itoa(int(shard))) + 1
	var lastSeq int64
	for r.err == nil && r.i < len(r.b) {
		h := r.run()
		r.skipPayloads(h.n)
		if r.err != nil {
			break
		}
		// Positions strictly increase within the message (a format-1
		// body's are checked by its readers; here runs must not overlap).
		if h.seq <= lastSeq {
			return fmt.Errorf("%w: positions do not increase", errStream2)
		}
		lastSeq = h.seq + int64(h.n) - 1
		events += h.n
		posBytes += h.n*prefix + digitsBetween(h.seq, lastSeq)
	}
	if r.err != nil {
		return r.err
	}
	out := StreamMessage{Context: string(ctx), Shard: int(shard), Events: make([]StreamEvent, 0, events)}
	var pos strings.Builder
	pos.Grow(posBytes)
	r.i = body
	shardText := strconv.AppendUint(nil, shard, 10)
	var num [20]byte
	for r.i < len(r.b) {
		h := r.run()
		pseudonym := string(h.pseudonym)
		t := time.Unix(0, h.nanos).UTC()
		for j := range h.n {
			// pos was grown to its final size: its String never moves,
			// and every Position is a piece of it.
			start := pos.Len()
			pos.WriteString(positionPrefix)
			pos.Write(shardText)
			pos.WriteByte('.')
			pos.Write(strconv.AppendInt(num[:0], h.seq+int64(j), 10))
			out.Events = append(out.Events, StreamEvent{Pseudonym: pseudonym, Version: h.version + int64(j),
				Time: t, Payload: r.bytes(math.MaxInt), Position: pos.String()[start:]})
		}
		if h.flags != 0 {
			last := &out.Events[len(out.Events)-1]
			last.IdempotencyKey, last.FirstVersion = string(h.key), h.firstVersion
		}
	}
	*m = out
	return nil
}

// digitsBetween is the number of decimal digits of the numbers from a to b.
func digitsBetween(a, b int64) int {
	n := 0
	for p, d := int64(1), 1; d <= 19; p, d = p*10, d+1 {
		lo := max(a, p)
		var hi int64
		if d == 19 {
			hi = b
		} else {
			hi = min(b, p*10-1)
		}
		if lo <= hi {
			n += int(hi-lo+1) * d
		}
	}
	return n
}

// Metadata of the durable consumers a projector makes on a context's
// stream: ConsumerMetaNode names its node, and ConsumerMetaStreamFormats
// lists the stream formats it reads ("1,2"; absent: format 1 alone). A
// relay writes format 2 only while every such durable reads it, since a
// projector running on its own (`kuma serve --target projector`) is no
// member of the cluster.
const (
	ConsumerMetaNode          = "kuma_projector_node"
	ConsumerMetaStreamFormats = "kuma_stream_formats"
)

// FormatList spells formats for ConsumerMetaStreamFormats: "1,2".
func FormatList(formats []int) string {
	b := make([]byte, 0, 2*len(formats))
	for i, f := range formats {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, int64(f), 10)
	}
	return string(b)
}

// ListReadsFormat reports whether a FormatList names format f (an empty
// list is format 1 alone).
func ListReadsFormat(list string, f int) bool {
	if list == "" {
		return f == StreamFormat1
	}
	for _, s := range strings.Split(list, ",") {
		if s == strconv.Itoa(f) {
			return true
		}
	}
	return false
}
