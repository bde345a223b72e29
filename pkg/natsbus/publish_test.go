package natsbus_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// inProcess is a real JetStream whose first publish is answered as
// nats-server answers a message id stuck "in process" (10158): after the
// message landed (an ack lost, the proposal applied after all) or without
// it landing (the proposal lost in a leader change).
type inProcess struct {
	jetstream.JetStream
	land     bool
	answered int
}

func (f *inProcess) PublishMsg(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	f.answered++
	if f.answered > 1 {
		return f.JetStream.PublishMsg(ctx, msg, opts...)
	}
	if f.land {
		if _, err := f.JetStream.PublishMsg(ctx, msg, opts...); err != nil {
			return nil, err
		}
	}
	return nil, &jetstream.APIError{Code: 409, ErrorCode: 10158, Description: "duplicate message id is in process"}
}

// TestPublishDedupedPastAStuckID: a message whose id JetStream keeps "in
// process" is stored by the retry without the id, once; and when the first
// proposal did land, the retry's compare-and-set fails instead of storing
// it twice.
func TestPublishDedupedPastAStuckID(t *testing.T) {
	srv := startMember(t, natsbus.ServerConfig{ServerName: "pub"})
	js, err := jetstream.New(connect(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "PUB", Subjects: []string{"pub.>"}})
	if err != nil {
		t.Fatal(err)
	}
	count := func(subject string) uint64 {
		t.Helper()
		info, err := stream.Info(ctx, jetstream.WithSubjectFilter(subject))
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Subjects[subject]
	}
	cas := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(0)}

	msg := nats.NewMsg("pub.lost")
	msg.Data = []byte("one")
	ack, err := natsbus.PublishDeduped(ctx, &inProcess{JetStream: js}, msg, "lost-1", cas...)
	if err != nil {
		t.Fatalf("a message whose first proposal was lost: %v", err)
	}
	got, err := stream.GetMsg(ctx, ack.Sequence)
	if err != nil || string(got.Data) != "one" || count("pub.lost") != 1 {
		t.Fatalf("stored %+v (%v), %d on the subject; want the message once", got, err, count("pub.lost"))
	}

	msg = nats.NewMsg("pub.landed")
	msg.Data = []byte("two")
	_, err = natsbus.PublishDeduped(ctx, &inProcess{JetStream: js, land: true}, msg, "landed-1", cas...)
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) || apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence {
		t.Fatalf("a retry after the first proposal landed: %v, want its compare-and-set to fail", err)
	}
	if n := count("pub.landed"); n != 1 {
		t.Fatalf("%d messages on the subject, want the one that landed", n)
	}

	// Any other answer is returned as it is, and a plain success needs no
	// second try.
	msg = nats.NewMsg("pub.plain")
	if _, err := natsbus.PublishDeduped(ctx, js, msg, "plain-1", cas...); err != nil || count("pub.plain") != 1 {
		t.Fatalf("plain publish: %v, %d stored", err, count("pub.plain"))
	}
}
