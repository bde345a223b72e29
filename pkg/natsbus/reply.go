package natsbus

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Header names of NATS service errors (the same the micro package uses).
const (
	HeaderErrorCode = micro.ErrorCodeHeader // "Nats-Service-Error-Code"
	HeaderError     = micro.ErrorHeader     // "Nats-Service-Error"
)

// RespondJSON answers msg with v encoded as JSON. A message with no reply
// subject (a publish, not a request), or one in a reserved namespace (see
// kuma.ReplyAllowed), is answered with nothing.
func RespondJSON(nc *nats.Conn, msg *nats.Msg, v any) error {
	if !kuma.ReplyAllowed(msg.Reply) || msg.Reply == "" {
		return nil
	}
	body, err := json.Marshal(v)
	if err != nil {
		return RespondError(nc, msg, err)
	}
	return nc.Publish(msg.Reply, body)
}

// RespondBody answers msg with an encoded body (see EncodeReply). A message
// with no reply subject is answered with nothing.
func RespondBody(nc *nats.Conn, msg *nats.Msg, body []byte) error {
	if msg.Reply == "" {
		return nil
	}
	return nc.Publish(msg.Reply, body)
}

// ReplyFailureCode is the protocol code a failed publish of an answer is
// counted under: payload_too_large when NATS refused it for its size,
// internal otherwise (the connection closed under it).
func ReplyFailureCode(err error) kuma.Code {
	if errors.Is(err, nats.ErrMaxPayload) {
		return kuma.CodePayloadTooLarge
	}
	return kuma.CodeInternal
}

// RespondError answers msg with a protocol error: the service error headers
// and the JSON body {"error": {...}}. Errors that are not *kuma.Error become
// internal, with their text withheld. Like RespondJSON, it sends nothing
// to a reserved reply subject.
func RespondError(nc *nats.Conn, msg *nats.Msg, err error) error {
	if !kuma.ReplyAllowed(msg.Reply) || msg.Reply == "" {
		return nil
	}
	out := ErrorMsg(msg.Reply, err)
	return nc.PublishMsg(out)
}

// ErrorMsg builds the error reply for err addressed to subject.
func ErrorMsg(subject string, err error) *nats.Msg {
	kerr := kuma.AsError(err)
	body, _ := json.Marshal(kuma.ErrorReply{Error: kerr})
	m := nats.NewMsg(subject)
	m.Header.Set(HeaderErrorCode, strconv.Itoa(kerr.Code.Status()))
	m.Header.Set(HeaderError, kerr.Message)
	m.Data = body
	return m
}

// ReplyError returns the protocol error carried by a reply, or nil when the
// reply is not an error. A reply with the headers but no parsable body still
// yields an error, built from the headers.
func ReplyError(msg *nats.Msg) error {
	if msg.Header == nil {
		return nil
	}
	codeNum := msg.Header.Get(HeaderErrorCode)
	if codeNum == "" {
		return nil
	}
	var body kuma.ErrorReply
	if err := json.Unmarshal(msg.Data, &body); err == nil && body.Error != nil && body.Error.Code != "" {
		return body.Error
	}
	n, _ := strconv.Atoi(codeNum)
	return &kuma.Error{Code: kuma.CodeForStatus(n), Message: msg.Header.Get(HeaderError)}
}

// IsNoResponders reports whether err means nobody listened on the subject:
// for Kuma, that the shard's owner is not there (yet), so a retry is safe.
func IsNoResponders(err error) bool { return errors.Is(err, nats.ErrNoResponders) }

// Flush waits until the server has processed everything sent on nc (so
// subscriptions made before it are live). nats.go insists on a deadline; a
// ctx without one gets 10 seconds.
func Flush(ctx context.Context, nc *nats.Conn) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	return nc.FlushWithContext(ctx)
}

// MicroError answers a micro service request with a protocol error: req.Error
// records the failure in the service's stats and sets the headers, and the
// body is the protocol's JSON. A request without a reply subject gets
// nothing.
func MicroError(req micro.Request, err error) error {
	if req.Reply() == "" {
		return nil
	}
	kerr := kuma.AsError(err)
	m := ErrorMsg(req.Reply(), kerr)
	return req.Error(m.Header.Get(HeaderErrorCode), kerr.Message, m.Data)
}
