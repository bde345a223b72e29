package kuma

import (
	"bytes"
	"unicode/utf8"
)

// maxFastDepth bounds the nesting the direct path follows inside data;
// deeper values go through encoding/json (which allows 10,000 levels).
const maxFastDepth = 64

// maxFastKeys bounds the keys of one object inside data that the direct
// path checks for duplicates; larger objects go through the general path.
const maxFastKeys = 32

// decodeAppendFast reads an append request as encoding/json writes one (the
// Go client's shape: keys in the struct's order, no whitespace outside data,
// no escapes or non-ASCII in type and idempotency_key) in one pass,
// validating each data value as it goes. It fails with errNotFast on
// anything else, which then takes the general path; so the direct path only
// ever gives what the general one would. It exists because validating a
// request and then decoding it were two scans of every byte of every event
// on the append path.
func decodeAppendFast(body []byte, out *AppendRequest) error {
	r := &fastReader{b: body, keys: make([]fastKey, 0, 16)}
	if err := r.lit(`{"events":[`); err != nil {
		return err
	}
	req := AppendRequest{Events: make([]EventInput, 0, bytes.Count(body, []byte(`{"type":"`)))}
	// The events' data are copied, as encoding/json copies them: the
	// request's buffer must not live on in the actor's state. One buffer
	// for all of them (the body's size bounds their sum), not one copy per
	// event: a hundred allocations per append were an eighth of decoding.
	// It lives as long as the append does; the fold's state is encoded
	// anew, not kept as slices of the data.
	data := make([]byte, 0, len(body))
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
			n := len(data)
			data = append(data, body[start:r.i]...)
			ev.Data = data[n:len(data):len(data)]
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
		// The keys of this object, to refuse one written twice: compared as
		// text (escapes decoded). An object with more keys than maxFastKeys
		// goes to the general path, so that the comparisons stay few.
		base := len(r.keys)
		err := r.members(`}`, func() error {
			if err := r.lit(`"`); err != nil {
				return err
			}
			if err := r.key(base); err != nil {
				return err
			}
			r.ws()
			if err := r.lit(`:`); err != nil {
				return err
			}
			r.ws()
			return r.value(depth + 1)
		})
		r.keys = r.keys[:base]
		return err
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

// fastKey is a key of an object open in data: where its text is (in the
// body, or decoded in the arena when it has escapes) and a fingerprint of
// its length, first and last bytes, which tells most unequal keys apart at
// once. No pointers: appending one costs no write barrier.
type fastKey struct {
	fp         uint64
	start, end int
	arena      bool
}

func (r *fastReader) keyText(k fastKey) []byte {
	if k.arena {
		return r.arena[k.start:k.end]
	}
	return r.b[k.start:k.end]
}

// key reads an object's key (its opening quote read) and refuses, by
// leaving it to the general path, one the object already has (its keys
// are r.keys[base:]).
func (r *fastReader) key(base int) error {
	start := r.i
	r.escaped = false
	if err := r.skipStr(); err != nil {
		return err
	}
	if len(r.keys)-base >= maxFastKeys {
		return errNotFast
	}
	k := fastKey{start: start, end: r.i - 1}
	text := r.b[k.start:k.end]
	if r.escaped {
		k.start = len(r.arena)
		r.arena = unescape(r.arena, text)
		k.end, k.arena = len(r.arena), true
		text = r.arena[k.start:k.end]
	}
	if n := len(text); n > 0 {
		k.fp = uint64(n)<<16 | uint64(text[0])<<8 | uint64(text[n-1])
	}
	for _, o := range r.keys[base:] {
		if o.fp == k.fp && string(r.keyText(o)) == string(text) {
			return errNotFast
		}
	}
	r.keys = append(r.keys, k)
	return nil
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
		// Most of a string is plain printable ASCII: skip it one table
		// lookup a byte, and judge only the byte that ends the run.
		for r.i < len(r.b) && strPlain[r.b[r.i]] {
			r.i++
		}
		if r.i >= len(r.b) {
			break
		}
		c := r.b[r.i]
		r.i++
		switch {
		case c == '"':
			return nil
		case c < 0x20 || c >= 0x80:
			return errNotFast
		case c == '\\':
			r.escaped = true
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
				// A surrogate (\ud800-\udfff), paired or lone, is for the
				// general path to judge; encoding/json never writes one.
				if h := r.b[r.i]; (h == 'd' || h == 'D') && r.b[r.i+1] >= '8' {
					return errNotFast
				}
				r.i += 4
			default:
				return errNotFast
			}
		}
	}
	return errNotFast
}

// unescape appends to out the text of a string that skipStr accepted (so
// every escape is well formed and none is a surrogate).
func unescape(out, raw []byte) []byte {
	for i := 0; i < len(raw); i++ {
		if raw[i] != '\\' {
			out = append(out, raw[i])
			continue
		}
		i++
		switch e := raw[i]; e {
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			var r rune
			for _, h := range raw[i+1 : i+5] {
				r = r<<4 | rune(hexVal(h))
			}
			out = utf8.AppendRune(out, r)
			i += 4
		default: // " \ /
			out = append(out, e)
		}
	}
	return out
}

func hexVal(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// strPlain marks the bytes that stand for themselves inside a string as
// skipStr reads it: printable ASCII but the quote and the backslash.
var strPlain = func() (t [256]bool) {
	for c := 0x20; c < 0x80; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

// number skips a JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
// One that might be beyond a double's range (more than 300 digits before
// the point, counting a positive exponent) goes to the general path, which
// refuses it if it is.
func (r *fastReader) number() error {
	if r.i < len(r.b) && r.b[r.i] == '-' {
		r.i++
	}
	intDigits := 1
	switch {
	case r.i < len(r.b) && r.b[r.i] == '0':
		r.i++
	default:
		if intDigits = r.digits(); intDigits == 0 {
			return errNotFast
		}
	}
	if r.i < len(r.b) && r.b[r.i] == '.' {
		r.i++
		if r.digits() == 0 {
			return errNotFast
		}
	}
	if r.i < len(r.b) && (r.b[r.i] == 'e' || r.b[r.i] == 'E') {
		r.i++
		neg := false
		if r.i < len(r.b) && (r.b[r.i] == '+' || r.b[r.i] == '-') {
			neg = r.b[r.i] == '-'
			r.i++
		}
		start := r.i
		n := r.digits()
		if n == 0 {
			return errNotFast
		}
		if !neg {
			if n > 3 {
				return errNotFast
			}
			exp := 0
			for _, d := range r.b[start:r.i] {
				exp = exp*10 + int(d-'0')
			}
			intDigits += exp
		}
	}
	if intDigits > 300 {
		return errNotFast
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
