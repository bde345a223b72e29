package natsbus

import (
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/replysize"
	"github.com/nats-io/nats.go"
)

// ReplyHeadroom is the part of the max payload an answer leaves free. A
// success reply carries no headers, but whoever relays it may add some
// (trace context), and an answer exactly at the limit would then be lost.
const ReplyHeadroom = 1024

// ReplyLimit is the largest answer body a responder on nc may send: the max
// payload of the server nc is connected to, less ReplyHeadroom. NATS
// refuses to publish a larger message, so a larger answer never arrives.
func ReplyLimit(nc *nats.Conn) int {
	return max(int(nc.MaxPayload())-ReplyHeadroom, 0)
}

// TooLarge is the payload_too_large error of an answer of size bytes over
// limit (replysize.TooLarge).
func TooLarge(size, limit int, what, hint string) *kuma.Error {
	return replysize.TooLarge(size, limit, what, hint)
}

// EncodeReply encodes v as an answer body and says whether it fits in
// limit bytes (replysize.Encode).
func EncodeReply(v any, limit int) (body []byte, fits bool, err error) {
	return replysize.Encode(v, limit)
}

// Page gathers the encoded items of one answer's array within a byte
// budget (replysize.Page).
type Page = replysize.Page

// NewPage starts an empty page for an answer of at most limit bytes
// (replysize.NewPage).
func NewPage(limit, around int) *Page { return replysize.NewPage(limit, around) }
