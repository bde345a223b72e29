package kuma

import "bytes"

// maxFastDepth bounds the nesting the direct path follows inside data;
// deeper values go through encoding/json (which allows 10,000 levels).
const maxFastDepth = 64

// decodeAppendFast reads an append request as encoding/json writes one (the
// Go client's shape: keys in the struct's order, no whitespace outside data,
// no escapes or non-ASCII in type and idempotency_key) in one pass,
// validating each data value as it goes. It fails with errNotFast on
// anything else, which then takes the general path; so the direct path only
// ever gives what the general one would. It exists because validating a
// request and then decoding it were two scans of every byte of every event
// on the append path.
func decodeAppendFast(body []byte, out *AppendRequest) error {
	r := &fastReader{b: body}
	if err := r.lit(`{"events":[`); err != nil {
		return err
	}
	req := AppendRequest{Events: make([]EventInput, 0, bytes.Count(body, []byte(`{"type":"`)))}
	err := r.items(func() error {
		if err := r.lit(`{"type":"`); err != nil {
			return err
		}
		typ, err := r.str()
		if err != nil {
			return err
		}
		ev := EventInput{Type: string(typ)}
		if r.lit(`,"data":`) == nil {
			start := r.i
			if err := r.value(0); err != nil {
				return err
			}
			// A copy, as encoding/json makes: the request's buffer must not
			// live on in the actor's state.
			ev.Data = bytes.Clone(body[start:r.i])
		}
		if err := r.lit(`}`); err != nil {
			return err
		}
		req.Events = append(req.Events, ev)
		return nil
	})
	if err != nil {
		return err
	}
	if r.lit(`,"expected_version":`) == nil {
		v, err := r.int()
		if err != nil {
			return err
		}
		req.ExpectedVersion = &v
	}
	if r.lit(`,"idempotency_key":"`) == nil {
		k, err := r.str()
		if err != nil {
			return err
		}
		req.IdempotencyKey = string(k)
	}
	if err := r.lit(`}`); err != nil || r.i != len(body) {
		return errNotFast
	}
	*out = req
	return nil
}

// value skips one JSON value (RFC 8259), checking it as it goes.
func (r *fastReader) value(depth int) error {
	if depth > maxFastDepth || r.i >= len(r.b) {
		return errNotFast
	}
	switch c := r.b[r.i]; {
	case c == '{':
		r.i++
		return r.members(`}`, func() error {
			if err := r.lit(`"`); err != nil {
				return err
			}
			if err := r.skipStr(); err != nil {
				return err
			}
			r.ws()
			if err := r.lit(`:`); err != nil {
				return err
			}
			r.ws()
			return r.value(depth + 1)
		})
	case c == '[':
		r.i++
		return r.members(`]`, func() error { return r.value(depth + 1) })
	case c == '"':
		r.i++
		return r.skipStr()
	case c == 't':
		return r.lit(`true`)
	case c == 'f':
		return r.lit(`false`)
	case c == 'n':
		return r.lit(`null`)
	case c == '-' || ('0' <= c && c <= '9'):
		return r.number()
	}
	return errNotFast
}

// members reads the rest of an object or array whose opening bracket was
// read: each member (read by each), whitespace allowed around the commas,
// up to close.
func (r *fastReader) members(close string, each func() error) error {
	r.ws()
	if r.lit(close) == nil {
		return nil
	}
	for {
		if err := each(); err != nil {
			return err
		}
		r.ws()
		if r.lit(`,`) != nil {
			return r.lit(close)
		}
		r.ws()
	}
}

// ws skips JSON whitespace.
func (r *fastReader) ws() {
	for r.i < len(r.b) {
		switch r.b[r.i] {
		case ' ', '\t', '\n', '\r':
			r.i++
		default:
			return
		}
	}
}

// skipStr skips the rest of a string (the opening quote already read),
// checking its escapes. Control characters and non-ASCII bytes go to the
// general path, which decides about them.
func (r *fastReader) skipStr() error {
	for r.i < len(r.b) {
		c := r.b[r.i]
		r.i++
		switch {
		case c == '"':
			return nil
		case c < 0x20 || c >= 0x80:
			return errNotFast
		case c == '\\':
			if r.i >= len(r.b) {
				return errNotFast
			}
			e := r.b[r.i]
			r.i++
			switch e {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if r.i+4 > len(r.b) {
					return errNotFast
				}
				for _, h := range r.b[r.i : r.i+4] {
					if !isHex(h) {
						return errNotFast
					}
				}
				r.i += 4
			default:
				return errNotFast
			}
		}
	}
	return errNotFast
}

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

// number skips a JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
func (r *fastReader) number() error {
	if r.i < len(r.b) && r.b[r.i] == '-' {
		r.i++
	}
	switch {
	case r.i < len(r.b) && r.b[r.i] == '0':
		r.i++
	case r.digits() == 0:
		return errNotFast
	}
	if r.i < len(r.b) && r.b[r.i] == '.' {
		r.i++
		if r.digits() == 0 {
			return errNotFast
		}
	}
	if r.i < len(r.b) && (r.b[r.i] == 'e' || r.b[r.i] == 'E') {
		r.i++
		if r.i < len(r.b) && (r.b[r.i] == '+' || r.b[r.i] == '-') {
			r.i++
		}
		if r.digits() == 0 {
			return errNotFast
		}
	}
	return nil
}

func (r *fastReader) digits() int {
	start := r.i
	for r.i < len(r.b) && '0' <= r.b[r.i] && r.b[r.i] <= '9' {
		r.i++
	}
	return r.i - start
}
