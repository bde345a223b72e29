// Package replysize holds the size rules every answer passes: the one
// encoding that is measured, the payload_too_large error, and pages cut to
// a byte budget. It knows nothing of NATS (the limit is a number the caller
// brings), so that code which must stay free of NATS, the entity actors,
// can apply them; natsbus forwards to it for everyone else.
package replysize

import (
	"encoding/json"
	"fmt"

	"github.com/kumadb/kuma/pkg/kuma"
)

// TooLarge is the payload_too_large error of an answer of size bytes over
// limit. what says what it was and hint what the client should do instead;
// the details carry both numbers, so a client can size its next request.
func TooLarge(size, limit int, what, hint string) *kuma.Error {
	return &kuma.Error{Code: kuma.CodePayloadTooLarge,
		Message: fmt.Sprintf("%s is %d bytes, more than the %d bytes one answer can carry (the NATS max payload); %s", what, size, limit, hint),
		Details: map[string]any{"size": size, "limit": limit}}
}

// Encode encodes v as an answer body (a json.RawMessage is taken as it
// is) and says whether it fits in limit bytes: this is the one size check
// every answer passes before it is counted and sent. An answer that does
// not fit is answered with TooLarge(len(body), limit, ...) instead.
func Encode(v any, limit int) (body []byte, fits bool, err error) {
	body, ok := v.(json.RawMessage)
	if !ok {
		if body, err = json.Marshal(v); err != nil {
			return nil, false, err
		}
	}
	return body, len(body) <= limit, nil
}

// Page gathers the encoded items of one answer's array (history's events,
// a query's rows) within a byte budget, so that a page is cut by size as
// well as by count and the caller says where the next one starts. Items are
// encoded once, as json.Marshal would inside the array. A Page is not safe
// for concurrent use.
type Page struct {
	Items [][]byte
	left  int // bytes the array may still take
	size  int // bytes it takes
}

// NewPage starts an empty page for an answer of at most limit bytes, around
// of which go to what surrounds the array.
func NewPage(limit, around int) *Page {
	return &Page{left: limit - around - len("[]"), size: len("[]")}
}

// Add encodes v and takes it if it fits in what is left. It returns whether
// it did, and the item's encoded size: an item that does not fit on an
// empty page cannot fit on any, and the caller answers payload_too_large.
func (p *Page) Add(v any) (bool, int, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return false, 0, err
	}
	need := len(b)
	if len(p.Items) > 0 {
		need++ // the comma
	}
	if need > p.left {
		return false, len(b), nil
	}
	p.left -= need
	p.size += need
	p.Items = append(p.Items, b)
	return true, len(b), nil
}

// Len is the number of items taken.
func (p *Page) Len() int { return len(p.Items) }

// Size is the encoded size of the array.
func (p *Page) Size() int { return p.size }

// AppendTo appends the items as one JSON array to b.
func (p *Page) AppendTo(b []byte) []byte {
	b = append(b, '[')
	for i, it := range p.Items {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, it...)
	}
	return append(b, ']')
}
