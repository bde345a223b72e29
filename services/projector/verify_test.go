package projector

import (
	"errors"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// TestVerifyStreamMessage: what each relay publishes passes (single node,
// cluster, epoch claims of an empty and a used shard); each disagreement
// between subject, headers and body is refused with its reason.
func TestVerifyStreamMessage(t *testing.T) {
	pos := func(seq int64) string { return kuma.Position{Shard: 2, Seq: seq}.String() }
	events := func(seqs ...int64) []kuma.StreamEvent {
		out := []kuma.StreamEvent{}
		for _, s := range seqs {
			out = append(out, kuma.StreamEvent{Entity: "e", Version: s, Position: pos(s)})
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		subject string
		headers map[string]string
		body    kuma.StreamMessage
		reason  string // "" when accepted
	}{
		{"single node", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(4, 5)}, ""},
		{"cluster", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.e3.5", kuma.HeaderLastPosition: pos(5), kuma.HeaderOwnerEpoch: "3"},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, ""},
		{"epoch claim", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.epoch.4", kuma.HeaderEpoch: "4", kuma.HeaderLastPosition: pos(9)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events()}, ""},
		{"epoch claim of an empty shard", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.epoch.1", kuma.HeaderEpoch: "1"},
			kuma.StreamMessage{Context: "c", Shard: 2}, ""},

		{"subject of another context", "kuma.d.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "subject"},
		{"subject under a shard", "kuma.c.events.2.x", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "subject"},
		{"subject shard 02", "kuma.c.events.02", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "subject"},
		{"body of another shard", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 3, Events: events(5)}, "its body names"},
		{"body of another context", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "x", Shard: 2, Events: events(5)}, "its body names"},
		{"no headers", "kuma.c.events.2", nil,
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "header Kuma-Last-Position"},
		{"no message id", "kuma.c.events.2", map[string]string{kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "message id"},
		{"last position not the last event's", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.4", kuma.HeaderLastPosition: pos(4)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(4, 5)}, "header Kuma-Last-Position"},
		{"id of another position", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.4", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "message id"},
		{"epoch header, id without", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5), kuma.HeaderOwnerEpoch: "3"},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "message id"},
		{"id with an epoch, no header", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.e3.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "message id"},
		{"bad owner epoch", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.ex.5", kuma.HeaderLastPosition: pos(5), kuma.HeaderOwnerEpoch: "x"},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "Kuma-Owner-Epoch"},
		{"positions going back", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.4", kuma.HeaderLastPosition: pos(4)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5, 4)}, "does not follow"},
		{"a position repeated", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5, 5)}, "does not follow"},
		{"a position of another shard", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: []kuma.StreamEvent{{Position: kuma.Position{Shard: 1, Seq: 5}.String()}}}, "not one of shard 2"},
		{"no events, no claim", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.5", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2}, "no events"},
		{"a claim with events", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.epoch.4", kuma.HeaderEpoch: "4", kuma.HeaderLastPosition: pos(5)},
			kuma.StreamMessage{Context: "c", Shard: 2, Events: events(5)}, "carries 1 events"},
		{"a claim with another id", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.epoch.5", kuma.HeaderEpoch: "4"},
			kuma.StreamMessage{Context: "c", Shard: 2}, "message id"},
		{"a claim at another shard's position", "kuma.c.events.2", map[string]string{nats.MsgIdHdr: "c.2.epoch.4", kuma.HeaderEpoch: "4", kuma.HeaderLastPosition: kuma.Position{Shard: 1, Seq: 5}.String()},
			kuma.StreamMessage{Context: "c", Shard: 2}, "stands at"},
	} {
		msg := &streamMessage{subject: tc.subject, header: tc.headers}
		err := verifyStreamMessage("c", 42, msg, &tc.body)
		var rj *rejectError
		switch {
		case tc.reason == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.reason != "" && (!errors.As(err, &rj) || rj.streamSeq != 42 || !strings.Contains(err.Error(), tc.reason)):
			t.Errorf("%s: got %v; want a rejection of message 42 saying %q", tc.name, err, tc.reason)
		}
	}
	for pos, want := range map[string]bool{"stream:42": true, "stream:": false, "stream:x": false, "stream:-1": false, "forget": false, "p1.2.5": false} {
		if got := isRejectedPosition(pos); got != want {
			t.Errorf("isRejectedPosition(%q) = %v, want %v", pos, got, want)
		}
	}
}
