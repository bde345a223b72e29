package natsbus

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go"
)

// Gather publishes msg to every subscriber of its subject with a reply
// inbox of its own (under the connection's inbox prefix) and collects the
// answers until enough says the answers so far suffice or ctx ends, which
// is how a scatter-gather request ends when some responder is gone: a
// deadline, not an error. The answers come in arrival order; enough may be
// nil (wait for ctx). The caller sets msg.Subject, Data and Header; Reply
// is overwritten.
func Gather(ctx context.Context, nc *nats.Conn, msg *nats.Msg, enough func(got []*nats.Msg) bool) ([]*nats.Msg, error) {
	inbox := nc.NewRespInbox()
	ch := make(chan *nats.Msg, 64)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return nil, fmt.Errorf("natsbus: gather on %s: %w", msg.Subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	msg.Reply = inbox
	if err := nc.PublishMsg(msg); err != nil {
		return nil, fmt.Errorf("natsbus: gather on %s: %w", msg.Subject, err)
	}
	var got []*nats.Msg
	for {
		if enough != nil && enough(got) {
			return got, nil
		}
		select {
		case m := <-ch:
			// The server's "no responders" status has no body and comes
			// from no one: nobody subscribes, which ctx would only confirm
			// later.
			if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
				return got, nil
			}
			got = append(got, m)
		case <-ctx.Done():
			return got, nil
		}
	}
}
