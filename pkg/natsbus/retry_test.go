package natsbus_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"

	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestJetStreamNotReady(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{fmt.Errorf("stream: %w", &jetstream.APIError{Code: 503, ErrorCode: 10023, Description: "insufficient resources"}), true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "no suitable peers for placement"}, true},
		{fmt.Errorf("create: %w", context.DeadlineExceeded), true},
		{nats.ErrTimeout, true},
		{nats.ErrNoResponders, true},
		{&jetstream.APIError{Code: 503, ErrorCode: jetstream.JSErrCodeJetStreamNotEnabled, Description: "jetstream not enabled"}, false},
		{&jetstream.APIError{Code: 400, ErrorCode: 10058, Description: "stream name already in use with a different configuration"}, false},
		{nats.ErrPermissionViolation, false},
		{errors.New("disk on fire"), false},
	} {
		if got := natsbus.JetStreamNotReady(tc.err); got != tc.want {
			t.Errorf("JetStreamNotReady(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestRetryJetStream(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	calls := 0
	err := natsbus.RetryJetStream(t.Context(), log, func(context.Context) error {
		calls++
		if calls < 3 {
			return &jetstream.APIError{Code: 503, ErrorCode: 10008}
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("not ready twice, then ready: err %v after %d calls, want nil after 3", err, calls)
	}

	calls = 0
	refused := &jetstream.APIError{Code: 400, ErrorCode: 10058}
	err = natsbus.RetryJetStream(t.Context(), log, func(context.Context) error { calls++; return refused })
	if !errors.Is(err, refused) || calls != 1 {
		t.Fatalf("a refusal: err %v after %d calls, want it at once", err, calls)
	}

	ctx, cancel := context.WithCancel(t.Context())
	calls = 0
	err = natsbus.RetryJetStream(ctx, log, func(context.Context) error {
		calls++
		cancel() // the caller gives up while JetStream is still not ready
		return nats.ErrTimeout
	})
	if !errors.Is(err, nats.ErrTimeout) || calls != 1 {
		t.Fatalf("cancelled: err %v after %d calls, want the last error after 1", err, calls)
	}
}
