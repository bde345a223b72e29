package shardnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go/jetstream"
)

// catchUpAndClaim brings a freshly leased shard up to the end of its
// subjects in the stream (events and forget notices after fromStreamSeq),
// then publishes the epoch claim, which succeeds only if nothing was
// published to the shard's subject since the catch-up read its end: a stale
// owner racing us makes the claim fail, and we read again.
func (sh *shard) catchUpAndClaim(ctx context.Context, fromStreamSeq uint64, epoch int64) error {
	stream, err := sh.js.Stream(ctx, kuma.StreamName(sh.cc.Name))
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
	// Just after a cluster formed (a standalone node's streams restored a
	// moment ago), JetStream may not answer for a while: wait for it here
	// rather than fail the take. A failed take costs a retake, and a file
	// not yet marked whole (written by a Kuma before the mark) trusts only
	// what the stream confirms of it at the retake (openOwned), dropping
	// acknowledged events nobody else ever had (seen in
	// TestStandaloneKilledThenClustered before the mark).
	var cons jetstream.Consumer
	err := natsbus.RetryJetStream(ctx, sh.logger, func(ctx context.Context) error {
		var err error
		cons, err = stream.OrderedConsumer(ctx, cfg)
		return err
	})
	if err != nil {
		return fmt.Errorf("shardnode: replay shard %d: %w", sh.n, err)
	}
	var batch []sqlite.ReplicatedEvent
	// Forget notices name entities by pseudonym; which of the file's ids
	// they stand for is found once the replay is done.
	forgot := map[string]bool{}
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
				// Either format, by its header. Format 2's payloads
				// share m.Data(), which the batch keeps alive until its
				// flush copies them into the file.
				var sm kuma.StreamMessage
				format, err := kuma.ParseStreamFormat(m.Headers().Get(kuma.HeaderFormat))
				if err == nil {
					err = kuma.DecodeStreamMessageFormat(format, m.Data(), &sm)
				}
				if err != nil {
					return fmt.Errorf("shardnode: replay shard %d: message %d: %w", sh.n, md.Sequence.Stream, err)
				}
				for _, e := range sm.Events {
					p, err := kuma.ParsePosition(e.Position)
					if err != nil {
						return fmt.Errorf("shardnode: replay shard %d: message %d: %w", sh.n, md.Sequence.Stream, err)
					}
					// The stream names the entity by pseudonym: the
					// keyvault gives its id while it lives; an entity
					// forgotten since keeps only its position.
					ent, gone, err := sh.keys.Resolve(ctx, sh.cc.Name, e)
					if err != nil {
						return fmt.Errorf("shardnode: replay shard %d: message %d: %w", sh.n, md.Sequence.Stream, err)
					}
					batch = append(batch, sqlite.ReplicatedEvent{OutboxEvent: sqlite.OutboxEvent{
						Seq: p.Seq, Entity: ent.Entity, Version: e.Version, Payload: e.Payload, Time: e.Time.UnixNano(),
						Idempotency: e.IdempotencyKey, FirstVersion: e.FirstVersion,
					}, Skipped: gone})
				}
			} else {
				var fn kuma.ForgottenNotice
				if err := json.Unmarshal(m.Data(), &fn); err != nil {
					return fmt.Errorf("shardnode: replay shard %d: forget notice %d: %w", sh.n, md.Sequence.Stream, err)
				}
				forgot[fn.Pseudonym+"\x00"+fn.Entity] = true
			}
			if len(batch) >= 2000 {
				if err := flush(); err != nil {
					return err
				}
			}
			if md.Sequence.Stream >= to {
				if err := flush(); err != nil {
					return err
				}
				return sh.purgeForgotten(ctx, forgot)
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

// purgeForgotten drops the rows of the entities that the replayed forget
// notices name (keys "<pseudonym>\x00<id>", one of the two set). A notice is
// believed only if the keyvault confirms the shred: anyone who can publish
// into the stream can write one. Notices name entities by pseudonym, and the
// keyvault no longer knows the id of a forgotten one, so the file's ids are
// turned into pseudonyms to find them (a rebuild that replayed a notice is
// rare, and the keyvault computes them without storage).
func (sh *shard) purgeForgotten(ctx context.Context, notices map[string]bool) error {
	if len(notices) == 0 {
		return nil
	}
	keys := sh.vault
	gone := map[string]bool{} // pseudonyms confirmed forgotten
	var purge []sqlite.ReplicatedEvent
	for n := range notices {
		pseudonym, entity, _ := strings.Cut(n, "\x00")
		var rec *kuma.ForgetReply
		var err error
		if pseudonym != "" {
			rec, err = keys.ForgottenPseudonym(ctx, sh.cc.Name, pseudonym)
		} else if kuma.ValidateEntityID(entity) == nil {
			rec, err = keys.Forgotten(ctx, sh.cc.Name, entity) // a notice written before pseudonyms
		}
		switch {
		case err != nil:
			return fmt.Errorf("shardnode: replay shard %d: confirm a forget notice: %w", sh.n, err)
		case rec == nil:
			sh.logger.Warn("forget notice of an entity that is not forgotten ignored (forged?)", "context", sh.cc.Name, "shard", sh.n)
		case pseudonym != "":
			gone[pseudonym] = true
		default:
			purge = append(purge, sqlite.ReplicatedEvent{OutboxEvent: sqlite.OutboxEvent{Entity: entity}, Forgotten: true})
		}
	}
	if len(gone) > 0 {
		ids, err := sh.store.EntityIDs(ctx)
		if err != nil {
			return err
		}
		for len(ids) > 0 {
			chunk := ids[:min(len(ids), 5000)]
			ids = ids[len(chunk):]
			ps, err := keys.Pseudonyms(ctx, sh.cc.Name, chunk)
			if err != nil {
				return fmt.Errorf("shardnode: replay shard %d: pseudonyms: %w", sh.n, err)
			}
			for i, p := range ps {
				if i < len(chunk) && gone[p] {
					purge = append(purge, sqlite.ReplicatedEvent{OutboxEvent: sqlite.OutboxEvent{Entity: chunk[i]}, Forgotten: true})
				}
			}
		}
	}
	if len(purge) == 0 {
		return nil
	}
	if _, err := sh.store.ApplyReplicated(ctx, purge); err != nil {
		return err
	}
	sh.logger.Info("catch-up dropped the rows of forgotten entities", "context", sh.cc.Name, "shard", sh.n, "entities", len(purge))
	return nil
}
