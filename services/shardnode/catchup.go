package shardnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go/jetstream"
)

// catchUpAndClaim brings a freshly leased shard up to the end of its
// subjects in the stream (events and forget notices after fromStreamSeq),
// then publishes the epoch claim, which succeeds only if nothing was
// published to the shard's subject since the catch-up read its end: a stale
// owner racing us makes the claim fail, and we read again.
func (sh *shard) catchUpAndClaim(ctx context.Context, fromStreamSeq uint64, epoch int64) error {
	stream, err := sh.node.js.Stream(ctx, kuma.StreamName(sh.cc.Name))
	if err != nil {
		return fmt.Errorf("shardnode: stream: %w", err)
	}
	for attempt := 0; ; attempt++ {
		end, endPos, err := lastOnSubject(ctx, stream, sh.relay.subject)
		if err != nil {
			return err
		}
		if fromStreamSeq == lastStreamSeqUnknown {
			fromStreamSeq = end
		}
		fend, _, err := lastOnSubject(ctx, stream, kuma.ForgottenSubject(sh.cc.Name, sh.n))
		if err != nil {
			return err
		}
		if target := max(end, fend); target > fromStreamSeq {
			if err := sh.replay(ctx, stream, fromStreamSeq, target); err != nil {
				return err
			}
		}
		// The stream's end for this shard must not be ahead of the file.
		// When it is, the file lost commits it had once: SQLite drops
		// every transaction after a WAL frame that fails its checksum,
		// silently, and an older copy put in place loses them too. The
		// file then answers with a past that is not the shard's, so it is
		// treated as damaged (corrupt.go).
		if last := sh.store.LastSeq(); endPos > last {
			return fmt.Errorf("%w: shard %d: the event stream reaches position %d but the file only %d: it lost committed events (a damaged WAL, or an older copy of the file)",
				sqlite.ErrCorrupt, sh.n, endPos, last)
		}
		sh.relay.subjSeq.Store(end)
		err = sh.relay.claim(ctx, epoch, endPos)
		if err == nil {
			return nil
		}
		if !isWrongLastSequence(err) || attempt >= 5 {
			return fmt.Errorf("shardnode: claim shard %d in the stream: %w", sh.n, err)
		}
		fromStreamSeq = end // someone published meanwhile: read it too
	}
}

// lastOnSubject returns the stream sequence and the position (from its
// Kuma-Last-Position header, 0 if none) of the subject's last message.
func lastOnSubject(ctx context.Context, stream jetstream.Stream, subject string) (uint64, int64, error) {
	msg, err := stream.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("shardnode: last message of %s: %w", subject, err)
	}
	if msg.Header.Get(kuma.HeaderLastPosition) == "" && msg.Header.Get(kuma.HeaderEpoch) == "" {
		return msg.Sequence, 0, nil // a forget notice: no position
	}
	pos, err := messagePosition(msg.Header)
	if err != nil {
		return 0, 0, fmt.Errorf("shardnode: last message of %s: %w", subject, err)
	}
	return msg.Sequence, pos, nil
}

// replay applies the shard's messages in (from, to] to its file, a batch
// at a time; what the file already holds is skipped.
func (sh *shard) replay(ctx context.Context, stream jetstream.Stream, from, to uint64) error {
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{sh.relay.subject, kuma.ForgottenSubject(sh.cc.Name, sh.n)},
		DeliverPolicy:  jetstream.DeliverAllPolicy,
	}
	if from > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from+1
	}
	cons, err := stream.OrderedConsumer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("shardnode: replay shard %d: %w", sh.n, err)
	}
	var batch []sqlite.ReplicatedEvent
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		_, err := sh.store.ApplyReplicated(ctx, batch)
		batch = batch[:0]
		return err
	}
	for {
		msgs, err := cons.Fetch(500, jetstream.FetchContext(ctx))
		if err != nil {
			return fmt.Errorf("shardnode: replay shard %d: %w", sh.n, err)
		}
		for m := range msgs.Messages() {
			md, err := m.Metadata()
			if err != nil {
				return err
			}
			if m.Subject() == sh.relay.subject {
				var sm kuma.StreamMessage
				if err := kuma.DecodeStreamMessage(m.Data(), &sm); err != nil {
					return fmt.Errorf("shardnode: replay shard %d: message %d: %w", sh.n, md.Sequence.Stream, err)
				}
				for _, e := range sm.Events {
					p, err := kuma.ParsePosition(e.Position)
					if err != nil {
						return fmt.Errorf("shardnode: replay shard %d: message %d: %w", sh.n, md.Sequence.Stream, err)
					}
					batch = append(batch, sqlite.ReplicatedEvent{OutboxEvent: sqlite.OutboxEvent{
						Seq: p.Seq, Entity: e.Entity, Version: e.Version, Payload: e.Payload, Time: e.Time.UnixNano(),
						Idempotency: e.IdempotencyKey, FirstVersion: e.FirstVersion,
					}})
				}
			} else {
				var fn kuma.ForgottenNotice
				if err := json.Unmarshal(m.Data(), &fn); err != nil {
					return fmt.Errorf("shardnode: replay shard %d: forget notice %d: %w", sh.n, md.Sequence.Stream, err)
				}
				batch = append(batch, sqlite.ReplicatedEvent{OutboxEvent: sqlite.OutboxEvent{Entity: fn.Entity}, Forgotten: true})
			}
			if len(batch) >= 2000 {
				if err := flush(); err != nil {
					return err
				}
			}
			if md.Sequence.Stream >= to {
				return flush()
			}
		}
		if err := msgs.Error(); err != nil {
			return fmt.Errorf("shardnode: replay shard %d: %w", sh.n, err)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}
