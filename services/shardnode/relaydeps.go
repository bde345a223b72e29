package shardnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"
)

// What the relay needs of the world, each as the small interface the relay
// declares, and the context's stream as JetStream keeps it.

// relayDeps is what a relay needs of its shard and node.
type relayDeps struct {
	kctx string // the context's name
	n    int    // the shard's number
	// stream is the context's event stream; outbox the shard file.
	stream relayStream
	outbox relayOutbox
	keys   pseudonymSource
	// gone ends when the shard's stop gives up: a publish in flight is cut
	// short, and appends waiting for the stream are answered.
	gone context.Context
	// lost stops serving the shard: another owner claimed it in the
	// stream. It must not wait for the relay.
	lost func(why string)
	// maxPayload is the NATS server's max payload (it may change with a
	// reconnect).
	maxPayload func() int64
	// format is the stream message format to write (the stream format
	// gate's, streamformat.go); nil: format 1.
	format    func() int
	logger    *slog.Logger
	tracer    trace.Tracer
	failpoint func(name string)
}

// relayOutbox is what the relay reads and notes in the shard file;
// *sqlite.Shard is one.
type relayOutbox interface {
	// Outbox returns up to max committed events after position from.
	Outbox(ctx context.Context, from int64, max int) ([]sqlite.OutboxEvent, error)
	// Committed is signalled after each commit.
	Committed() <-chan struct{}
	// LastSeq is the last committed position.
	LastSeq() int64
	// Published and SetPublished are the relay's own note of its position.
	Published(ctx context.Context) (int64, error)
	SetPublished(ctx context.Context, p int64) error
}

// pseudonymSource names entities in the stream; the key cache is one.
type pseudonymSource interface {
	Entry(ctx context.Context, kctx, entity string, create bool) (keycache.Entry, error)
}

// relayStream is what the relay needs of its context's JetStream stream;
// jsStream is the real one.
type relayStream interface {
	// publish stores msg under message id id if the subject's last message
	// is stream sequence lastSeq (0: none), and returns msg's sequence. A
	// failed compare-and-set is an error isWrongLastSequence tells.
	publish(ctx context.Context, msg *nats.Msg, id string, lastSeq uint64) (uint64, error)
	// announce stores msg under message id id, with no compare-and-set.
	announce(ctx context.Context, msg *nats.Msg, id string) error
	// last is the subject's last message (jetstream.ErrMsgNotFound: none).
	last(ctx context.Context, subject string) (*jetstream.RawStreamMsg, error)
}

// jsStream is a context's stream in JetStream.
type jsStream struct {
	js   jetstream.JetStream
	name string // kuma.StreamName of the context
}

func (s jsStream) publish(ctx context.Context, msg *nats.Msg, id string, lastSeq uint64) (uint64, error) {
	ack, err := natsbus.PublishDeduped(ctx, s.js, msg, id, jetstream.WithExpectStream(s.name),
		jetstream.WithExpectLastSequencePerSubject(lastSeq))
	if err != nil {
		return 0, err
	}
	return ack.Sequence, nil
}

func (s jsStream) announce(ctx context.Context, msg *nats.Msg, id string) error {
	_, err := s.js.PublishMsg(ctx, msg, jetstream.WithMsgID(id), jetstream.WithExpectStream(s.name))
	return err
}

func (s jsStream) last(ctx context.Context, subject string) (*jetstream.RawStreamMsg, error) {
	stream, err := s.js.Stream(ctx, s.name)
	if err != nil {
		return nil, fmt.Errorf("relay: stream: %w", err)
	}
	return stream.GetLastMsgForSubject(ctx, subject)
}

// ensureStream creates or updates the context's stream. Its server must run
// with sync always (the embedded one does) for a publish ack to mean the
// events are on disk.
func ensureStream(ctx context.Context, js jetstream.JetStream, name string, replicas int) error {
	_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        kuma.StreamName(name),
		Description: "Kuma events of context " + name,
		Subjects:    []string{kuma.EventsWildcard(name)},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Duplicates:  2 * time.Minute,
		Replicas:    replicas,
		MaxMsgSize:  int32(relayMaxBytes * 2),
	})
	if err != nil {
		return fmt.Errorf("shardnode: stream %s: %w", kuma.StreamName(name), err)
	}
	return nil
}

// isWrongLastSequence tells a failed compare-and-set on the stream.
func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// messagePosition is the shard position a stream message ends at: its
// Kuma-Last-Position header, or 0 for the epoch claim of an empty shard.
func messagePosition(h nats.Header) (int64, error) {
	v := h.Get(kuma.HeaderLastPosition)
	if v == "" && h.Get(kuma.HeaderEpoch) != "" {
		return 0, nil
	}
	p, err := kuma.ParsePosition(v)
	if err != nil {
		return 0, fmt.Errorf("no valid %s header: %w", kuma.HeaderLastPosition, err)
	}
	return p.Seq, nil
}
