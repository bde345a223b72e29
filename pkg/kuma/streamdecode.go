package kuma

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strconv"
)

// DecodeStreamMessage decodes a stream message. Messages as the relay
// writes them (encoding/json's output for StreamMessage: that key order, no
// whitespace, no escapes) take a direct path that reads the bytes once;
// anything else, any valid JSON of the same meaning included, goes through
// encoding/json, so the result is the same either way. The direct path
// exists because validating and decoding a message of a thousand sealed
// payloads with encoding/json was a projector's largest cost.
func DecodeStreamMessage(data []byte, m *StreamMessage) error {
	if err := decodeStreamFast(data, m); err == nil {
		return nil
	}
	*m = StreamMessage{}
	return json.Unmarshal(data, m)
}

var errNotFast = errors.New("kuma: not the relay's exact encoding")

// fastReader walks the bytes of one message; every method fails with
// errNotFast on anything unexpected.
type fastReader struct {
	b []byte
	i int
	// The append path's keys of the objects open in data, the decoded
	// text of those with escapes, and whether the last string had one.
	keys    []fastKey
	arena   []byte
	escaped bool
}

func (r *fastReader) lit(s string) error {
	if !bytes.HasPrefix(r.b[r.i:], []byte(s)) {
		return errNotFast
	}
	r.i += len(s)
	return nil
}

// str reads a string without escapes up to its closing quote (the opening
// one already read).
func (r *fastReader) str() ([]byte, error) {
	start := r.i
	for r.i < len(r.b) {
		c := r.b[r.i]
		switch {
		case c == '"':
			s := r.b[start:r.i]
			r.i++
			return s, nil
		case c == '\\' || c < 0x20 || c >= 0x80:
			return nil, errNotFast // escapes and non-ASCII: the general path
		}
		r.i++
	}
	return nil, errNotFast
}

// items reads the rest of a list written with no whitespace (its '[' already
// read): each item, read by each, then a comma or the closing ']'.
func (r *fastReader) items(each func() error) error {
	for first := true; ; first = false {
		if r.lit(`]`) == nil {
			return nil
		}
		if !first {
			if err := r.lit(`,`); err != nil {
				return err
			}
		}
		if err := each(); err != nil {
			return err
		}
	}
}

func (r *fastReader) int() (int64, error) {
	start := r.i
	for r.i < len(r.b) && (r.b[r.i] == '-' || ('0' <= r.b[r.i] && r.b[r.i] <= '9')) {
		r.i++
	}
	n, err := strconv.ParseInt(string(r.b[start:r.i]), 10, 64)
	if err != nil || (r.i-start > 1 && r.b[start] == '0') {
		return 0, errNotFast
	}
	return n, nil
}

func decodeStreamFast(data []byte, m *StreamMessage) error {
	r := &fastReader{b: data}
	if err := r.lit(`{"context":"`); err != nil {
		return err
	}
	ctx, err := r.str()
	if err != nil {
		return err
	}
	if err := r.lit(`,"shard":`); err != nil {
		return err
	}
	shard, err := r.int()
	if err != nil || shard < 0 || shard > 1<<31-1 {
		return errNotFast
	}
	if err := r.lit(`,"events":`); err != nil {
		return err
	}
	out := StreamMessage{Context: string(ctx), Shard: int(shard)}
	if r.lit(`null`) == nil {
		out.Events = nil
	} else {
		if err := r.lit(`[`); err != nil {
			return err
		}
		out.Events = make([]StreamEvent, 0, bytes.Count(data[r.i:], []byte(`,"version":`)))
		err := r.items(func() error {
			ev, err := r.event()
			out.Events = append(out.Events, ev)
			return err
		})
		if err != nil {
			return err
		}
	}
	if err := r.lit(`}`); err != nil || r.i != len(data) {
		return errNotFast
	}
	*m = out
	return nil
}

func (r *fastReader) event() (StreamEvent, error) {
	var ev StreamEvent
	// A message names an entity by its pseudonym, or (written before
	// pseudonyms) by its id.
	var pseudonym, entity []byte
	var err error
	switch {
	case r.lit(`{"pseudonym":"`) == nil:
		pseudonym, err = r.str()
	case r.lit(`{"entity":"`) == nil:
		entity, err = r.str()
	default:
		err = errNotFast
	}
	if err != nil {
		return ev, err
	}
	if err := r.lit(`,"version":`); err != nil {
		return ev, err
	}
	if ev.Version, err = r.int(); err != nil {
		return ev, err
	}
	if err := r.lit(`,"position":"`); err != nil {
		return ev, err
	}
	pos, err := r.str()
	if err != nil {
		return ev, err
	}
	if err := r.lit(`,"time":"`); err != nil {
		return ev, err
	}
	ts, err := r.str()
	if err != nil {
		return ev, err
	}
	// The same strict RFC 3339 parse as time.Time's UnmarshalJSON.
	if err := ev.Time.UnmarshalText(ts); err != nil {
		return ev, errNotFast
	}
	if err := r.lit(`,"payload":`); err != nil {
		return ev, err
	}
	if r.lit(`null`) != nil {
		if err := r.lit(`"`); err != nil {
			return ev, err
		}
		p, err := r.str()
		if err != nil {
			return ev, err
		}
		ev.Payload = make([]byte, base64.StdEncoding.DecodedLen(len(p)))
		n, err := base64.StdEncoding.Decode(ev.Payload, p)
		if err != nil {
			return ev, errNotFast
		}
		ev.Payload = ev.Payload[:n]
	}
	if r.lit(`,"idempotency_key":"`) == nil {
		k, err := r.str()
		if err != nil {
			return ev, err
		}
		ev.IdempotencyKey = string(k)
		if r.lit(`,"first_version":`) == nil {
			if ev.FirstVersion, err = r.int(); err != nil {
				return ev, err
			}
		}
	} else if r.lit(`,"first_version":`) == nil {
		if ev.FirstVersion, err = r.int(); err != nil {
			return ev, err
		}
	}
	if err := r.lit(`}`); err != nil {
		return ev, err
	}
	ev.Pseudonym, ev.Entity, ev.Position = string(pseudonym), string(entity), string(pos)
	return ev, nil
}
