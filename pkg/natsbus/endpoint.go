package natsbus

import (
	"context"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// JSONEndpoint is how Kuma's services answer a micro endpoint: Answer runs
// under the caller's trace context and a time limit, its result goes back
// as JSON, and its error with the protocol's code. It is a micro.Handler.
type JSONEndpoint struct {
	// Answer computes the answer to one request.
	Answer func(ctx context.Context, req micro.Request) (any, error)
	// Timeout bounds Answer's ctx (0: 10 s).
	Timeout time.Duration
	// MaxReply bounds the answer's body (0: unchecked here; NATS refuses
	// what exceeds its max payload, and the caller then times out). An
	// answer over it is sent as payload_too_large, with Hint saying what
	// to ask for instead.
	MaxReply int
	Hint     string
	// Answered, if set, learns the outcome (nil or the error about to be
	// sent) before the reply goes, so that whoever got a reply finds it
	// counted.
	Answered func(req micro.Request, err error)
	// ReplyFailed, if set, learns that sending the reply failed.
	ReplyFailed func(req micro.Request, err error)
}

// Handle answers req; it makes JSONEndpoint a micro.Handler.
func (e JSONEndpoint) Handle(req micro.Request) {
	timeout := e.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx := telemetry.Extract(context.Background(), nats.Header(req.Headers()))
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	out, err := e.Answer(ctx, req)
	var body []byte
	if err == nil {
		limit := e.MaxReply
		if limit <= 0 {
			limit = int(^uint(0) >> 1)
		}
		var fits bool
		if body, fits, err = EncodeReply(out, limit); err == nil && !fits {
			hint := e.Hint
			if hint == "" {
				hint = "ask for less"
			}
			err = TooLarge(len(body), limit, "the answer to "+req.Subject(), hint)
		}
	}
	if e.Answered != nil {
		e.Answered(req, err)
	}
	if err != nil {
		err = MicroError(req, err)
	} else {
		err = req.Respond(body)
	}
	if err != nil && e.ReplyFailed != nil {
		e.ReplyFailed(req, err)
	}
}

// Code is the protocol code of an endpoint's outcome, "ok" for none, as
// the services' request metrics label it.
func Code(err error) string {
	if err == nil {
		return "ok"
	}
	return string(kuma.ErrorCode(err))
}
