package projector

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// rejectedPrefix names, where a position is expected (status, a skip
// request, _kuma_skipped), a stream message the projector refused:
// "stream:<sequence>". Such a message has no position of its own that can be
// trusted.
const rejectedPrefix = "stream:"

func rejectedPosition(streamSeq uint64) string {
	return rejectedPrefix + strconv.FormatUint(streamSeq, 10)
}

// rejectError is a stream message the relay did not publish as it is: its
// subject, headers and body disagree. The projection stops at it, visibly,
// until an operator skips it; applying it could move a shard's position
// past real events, and retrying it forever (as any other failure is) would
// hide that anything is wrong.
type rejectError struct {
	streamSeq uint64
	reason    string
}

func (e *rejectError) Error() string {
	return fmt.Sprintf("stream message %d was not published by a shard's relay: %s", e.streamSeq, e.reason)
}

// verifyStreamMessage checks that an events message is what a relay
// publishes (services/shardnode/relay.go, PROTOCOL.md "The event stream"),
// in either body format (the Kuma-Format header said which, and a body
// that is not of its header's format was rejected as it was decoded):
//
//   - its subject is kuma.<ctx>.events.<shard> of this projector's context,
//     and its body names the same context and shard;
//   - an epoch claim (Kuma-Epoch) has no events and the id
//     <ctx>.<shard>.epoch.<epoch>;
//   - otherwise it has events, in increasing positions of that shard;
//     Kuma-Last-Position is the last one's; Nats-Msg-Id is
//     <ctx>.<shard>.<last sequence>, or <ctx>.<shard>.e<epoch>.<last sequence>
//     with Kuma-Owner-Epoch <epoch> in a cluster.
//
// Forget notices (kuma.<ctx>.events.<shard>.forgotten) are checked where
// they are decoded.
func verifyStreamMessage(kctx string, seq uint64, msg *streamMessage, sm *kuma.StreamMessage) error {
	reject := func(format string, args ...any) error {
		return &rejectError{streamSeq: seq, reason: fmt.Sprintf(format, args...)}
	}
	subject := msg.subject
	prefix := kuma.PublicPrefix + "." + kctx + ".events."
	rest, ok := strings.CutPrefix(subject, prefix)
	shard, err := strconv.Atoi(rest)
	if !ok || err != nil || shard < 0 || strconv.Itoa(shard) != rest {
		return reject("subject %q is not %s<shard>", subject, prefix)
	}
	if sm.Context != kctx || sm.Shard != shard {
		return reject("its body names context %q shard %d, its subject %s", sm.Context, sm.Shard, subject)
	}
	id := msg.header[nats.MsgIdHdr]
	idPrefix := kctx + "." + rest + "."
	lastHdr := msg.header[kuma.HeaderLastPosition]
	if epoch := msg.header[kuma.HeaderEpoch]; epoch != "" {
		if len(sm.Events) > 0 {
			return reject("an epoch claim carries %d events", len(sm.Events))
		}
		if e, err := strconv.ParseInt(epoch, 10, 64); err != nil || e <= 0 || id != idPrefix+"epoch."+epoch {
			return reject("epoch claim %q has message id %q", epoch, id)
		}
		if lastHdr != "" {
			if p, err := kuma.ParsePosition(lastHdr); err != nil || p.Shard != shard {
				return reject("epoch claim stands at %q, not a position of shard %d", lastHdr, shard)
			}
		}
		return nil
	}
	if len(sm.Events) == 0 {
		return reject("it has no events and is no epoch claim")
	}
	var last kuma.Position
	for i, se := range sm.Events {
		p, err := kuma.ParsePosition(se.Position)
		if err != nil || p.Shard != shard {
			return reject("event %d has position %q, not one of shard %d", i, se.Position, shard)
		}
		if i > 0 && p.Seq <= last.Seq {
			return reject("event %d's position %s does not follow %s", i, se.Position, last)
		}
		last = p
	}
	if lastHdr != last.String() {
		return reject("header %s is %q, its last event is at %s", kuma.HeaderLastPosition, lastHdr, last)
	}
	lastSeq := strconv.FormatInt(last.Seq, 10)
	want := idPrefix + lastSeq
	if epoch := msg.header[kuma.HeaderOwnerEpoch]; epoch != "" {
		if e, err := strconv.ParseInt(epoch, 10, 64); err != nil || e <= 0 {
			return reject("header %s is %q", kuma.HeaderOwnerEpoch, epoch)
		}
		want = idPrefix + "e" + epoch + "." + lastSeq
	}
	if id != want {
		return reject("message id %q, want %q for these events", id, want)
	}
	return nil
}

// isRejectedPosition tells a skip request naming a rejected message.
func isRejectedPosition(position string) bool {
	n, ok := strings.CutPrefix(position, rejectedPrefix)
	if !ok {
		return false
	}
	_, err := strconv.ParseUint(n, 10, 64)
	return err == nil
}
