package natsbus

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// codeMsgIDInProcess is JetStream's "duplicate message id is in process"
// (nats-server's JSStreamDuplicateMessageConflict).
const codeMsgIDInProcess jetstream.ErrorCode = 10158

// PublishDeduped publishes msg to a stream under the message id id and
// opts, which must include a compare-and-set
// (jetstream.WithExpectLastSequencePerSubject or WithExpectLastSequence).
//
// JetStream answers 10158 ("duplicate message id is in process") while an
// earlier proposal of the same id has no outcome yet, and a proposal lost
// in a leader change keeps its id in that state until the duplicate window
// ends (two minutes): seen after a network partition healed, where a
// relay's retry of the very message it had sent kept getting 10158 and its
// shard's appends waited. The compare-and-set alone is enough to keep a
// retry from storing a message twice (if the first proposal lands after
// all, the retry fails its compare-and-set, and whoever sent it checks what
// landed), so on 10158 the message goes again without its id.
func PublishDeduped(ctx context.Context, js jetstream.JetStream, msg *nats.Msg, id string, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	ack, err := js.PublishMsg(ctx, msg, append(opts[:len(opts):len(opts)], jetstream.WithMsgID(id))...)
	var apiErr *jetstream.APIError
	if err == nil || !errors.As(err, &apiErr) || apiErr.ErrorCode != codeMsgIDInProcess {
		return ack, err
	}
	// PublishMsg wrote the id into the message's headers.
	msg.Header.Del(jetstream.MsgIDHeader)
	return js.PublishMsg(ctx, msg, opts...)
}
