package keyvault

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The JetStream store keeps everything in the bucket cluster.KeysBucket, a
// stream laid out as a KV bucket (stream KV_<bucket>, subjects
// $KV.<bucket>.<key>, so `nats kv get` reads it and NATS permissions name
// it like the other buckets) that the store creates itself, because its
// settings differ from what `nats kv add` gives:
//   - deletes are allowed (DenyDelete off): a forget erases the message
//     holding the wrapped key with JetStream's secure delete, which
//     overwrites its bytes in every replica's block file; a KV delete or
//     purge would only mark it deleted and leave the bytes on disk, so
//     purges and roll-ups (which purge) are refused;
//   - direct gets are off: every read goes to the stream leader, which has
//     applied every acknowledged write, so an instance never misses a key or
//     a tombstone another instance has just written (a direct get may be
//     answered by a lagging follower).
//
// Keys (a pseudonym is base64url, a valid KV key token):
//
//	meta.idkey              the id key, sealed by the master key; first writer wins
//	k.<ctx>.<pseudonym>     the entity's id and data key, sealed by the master key
//	f.<pseudonym>           the tombstone of a forgotten id: time, events deleted,
//	                        reason and requester (the audit record); no id
//
// Creates are compare-and-set (expected last subject sequence 0), so two
// instances creating one entity's key agree on the first one written.
type jetStreamStore struct {
	js  jetstream.JetStream
	st  jetstream.Stream
	kek *envelope.Key
	log *slog.Logger
	now func() time.Time
}

const (
	keysStream = "KV_" + cluster.KeysBucket
	keysPrefix = "$KV." + cluster.KeysBucket + "."
	idKeySubj  = keysPrefix + "meta.idkey"
	// keysHistory: a subject is written once, but should a key ever be
	// rewritten (a master-key rotation of the bucket, not built yet), the
	// old message must stay until erased, not be dropped by the limit,
	// which deletes without overwriting.
	keysHistory = 64
)

func keySubj(kctx string, hash []byte) string {
	return keysPrefix + "k." + kctx + "." + encodePseudonym(hash)
}

// tombSubj names a tombstone by the id hash alone, which covers the context
// already, as the file store's shredded table does: so an import needs no
// context for a forgotten id.
func tombSubj(hash []byte) string { return keysPrefix + "f." + encodePseudonym(hash) }

// keysStreamConfig is the bucket's stream. DenyPurge, and no roll-ups
// (which purge): a purge, like a KV delete, would leave the bytes of what it
// removes on disk.
func keysStreamConfig(replicas int) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:              keysStream,
		Description:       "Kuma keyvault: wrapped data keys and tombstones (services/keyvault/jetstreamstore.go)",
		Subjects:          []string{keysPrefix + ">"},
		MaxMsgsPerSubject: keysHistory,
		MaxMsgs:           -1,
		MaxBytes:          -1,
		Discard:           jetstream.DiscardNew,
		Storage:           jetstream.FileStorage,
		Replicas:          replicas,
		Duplicates:        2 * time.Minute,
		DenyPurge:         true,
		AllowDirect:       false,
	}
}

// sealedKey is the plaintext of a k.* value.
type sealedKey struct {
	Entity    string `json:"entity"`
	Key       []byte `json:"key"`
	CreatedAt int64  `json:"created_at"`
}

// tombstone is a f.* value.
type tombstone struct {
	At            int64  `json:"at"`
	EventsDeleted int64  `json:"events_deleted"`
	Reason        string `json:"reason,omitempty"`
	RequestedBy   string `json:"requested_by,omitempty"`
}

// keyAAD binds a sealed key to its subject: a value copied under another
// pseudonym or context does not open.
func keyAAD(kctx string, hash []byte) []byte {
	return envelope.AAD(envelope.PurposeDataKey, kctx, "kv/"+encodePseudonym(hash), 0)
}

// peersTimeout bounds the count of the cluster's JetStream servers.
const peersTimeout = 2 * time.Second

// openJetStream opens (or creates) the bucket, loads or creates its id key
// and imports the keys of cfg.Path's file, if it holds any.
func openJetStream(ctx context.Context, nc *nats.Conn, kek *envelope.Key, cfg Config) (*jetStreamStore, []byte, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, nil, fmt.Errorf("keyvault: jetstream: %w", err)
	}
	s := &jetStreamStore{js: js, kek: kek, log: cfg.Logger, now: cfg.Now}
	var file *fileKeys
	if cfg.Path != "" {
		if file, err = readFileKeys(ctx, cfg.Path, kek); err != nil {
			return nil, nil, err
		}
	}
	var idKey []byte
	err = natsbus.RetryJetStream(ctx, cfg.Logger, func(ctx context.Context) error {
		if err := s.ensureStream(ctx, nc, cfg.Replicas); err != nil {
			return err
		}
		var want []byte
		if file != nil {
			want = file.idKey
		}
		idKey, err = s.loadIDKey(ctx, want)
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("keyvault: bucket %s: %w", cluster.KeysBucket, err)
	}
	if file != nil {
		if !bytes.Equal(file.idKey, idKey) {
			return nil, nil, fmt.Errorf("keyvault: %s holds %d keys and %d forgotten ids, but the bucket %s was started by another "+
				"keyvault first, with another id key: importing them would change their pseudonyms in the event stream. "+
				"Stop every node, delete the bucket if it holds no key of its own (nats stream rm %s), and start this node first",
				cfg.Path, len(file.keys), len(file.shredded), cluster.KeysBucket, keysStream)
		}
		if err := s.importFile(ctx, cfg.Path, file); err != nil {
			return nil, nil, err
		}
	}
	return s, idKey, nil
}

// ensureStream creates the bucket's stream with the cluster's replica
// count (natsbus.Replicas of its JetStream servers, at least min), or binds
// to it. It never changes an existing one's replicas: shardnodes raise them
// as the cluster grows (services/shardnode/replicas.go), never lower them.
func (s *jetStreamStore) ensureStream(ctx context.Context, nc *nats.Conn, min int) error {
	replicas := max(min, 1)
	if nc.ConnectedClusterName() != "" {
		pctx, cancel := context.WithTimeout(ctx, peersTimeout)
		peers, err := natsbus.JetStreamPeers(pctx, nc)
		cancel()
		if err == nil {
			replicas = max(replicas, natsbus.Replicas(peers))
		}
	}
	st, err := s.js.Stream(ctx, keysStream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		st, err = s.js.CreateStream(ctx, keysStreamConfig(replicas))
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			st, err = s.js.Stream(ctx, keysStream) // another instance created it first
		}
	}
	if err != nil {
		return err
	}
	if c := st.CachedInfo().Config; c.DenyDelete || c.AllowDirect {
		return fmt.Errorf("stream %s denies deletes or allows direct gets (was it made by `nats kv add`?): "+
			"forgets could not erase keys; remove it (it must hold no key yet) and start again", keysStream)
	}
	s.st = st
	return nil
}

// loadIDKey returns the bucket's id key, writing want (or a new random
// key) first if it has none. The first writer wins; a value the master key
// does not open is a wrong master key.
func (s *jetStreamStore) loadIDKey(ctx context.Context, want []byte) ([]byte, error) {
	for range 3 {
		msg, err := s.last(ctx, idKeySubj)
		if err == nil {
			idKey, err := s.kek.Open(msg.Data, idKeyAAD)
			if err != nil {
				return nil, fmt.Errorf("the master key does not open the bucket %s; it was created with another key "+
					"(every node of a cluster must be given the same --master-key-file / KUMA_MASTER_KEY)", cluster.KeysBucket)
			}
			return idKey, nil
		}
		if !errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil, err
		}
		idKey := want
		if idKey == nil {
			idKey = envelope.NewRandomKey()
		}
		err = s.create(ctx, idKeySubj, s.kek.Seal(nil, idKey, idKeyAAD))
		if err == nil {
			return idKey, nil
		}
		if !wrongLastSeq(err) {
			return nil, err
		}
		// Another instance wrote it first: read the winner.
	}
	return nil, errors.New("the id key could not be read or written")
}

func wrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence
}

func msgNotFound(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrMsgNotFound) || errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeMessageNotFound
}

// attemptTimeout bounds one JetStream request. A request sent while the
// bucket has no leader (an election, some seconds after its leader's node
// died) is never answered, so it is sent again, until the caller's ctx ends:
// the operation completes as soon as a leader answers, instead of waiting
// out the caller's whole deadline on a request nobody will answer.
const attemptTimeout = 2 * time.Second

// retried runs f, and again while JetStream is not ready, within ctx. A
// write sent again after a lost answer is harmless here: every write is a
// create-if-absent whose conflict reads what is there, and an erase of a
// message already gone is no failure.
func retried[T any](ctx context.Context, f func(context.Context) (T, error)) (T, error) {
	for {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		v, err := f(actx)
		cancel()
		if err == nil || ctx.Err() != nil || !(natsbus.JetStreamNotReady(err) || errors.Is(err, jetstream.ErrNoStreamResponse)) {
			return v, err
		}
		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// last is the newest message of a subject (jetstream.ErrMsgNotFound: none).
func (s *jetStreamStore) last(ctx context.Context, subj string) (*jetstream.RawStreamMsg, error) {
	return retried(ctx, func(ctx context.Context) (*jetstream.RawStreamMsg, error) {
		return s.st.GetLastMsgForSubject(ctx, subj)
	})
}

// create writes a subject's first message; a wrong-last-sequence error
// says another is there already.
func (s *jetStreamStore) create(ctx context.Context, subj string, data []byte) error {
	_, err := retried(ctx, func(ctx context.Context) (*jetstream.PubAck, error) {
		return s.js.Publish(ctx, subj, data, jetstream.WithExpectLastSequencePerSubject(0))
	})
	return err
}

// internal logs a store failure and answers internal, which never leaks it.
func (s *jetStreamStore) internal(what string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return kuma.Errorf(kuma.CodeTimeout, "keyvault: %s timed out", what)
	}
	if natsbus.JetStreamNotReady(err) {
		return kuma.Errorf(kuma.CodeUnavailable, "keyvault: the key bucket is not answering; retry")
	}
	s.log.Error("keyvault bucket failed", "op", what, "err", err)
	return kuma.Errorf(kuma.CodeInternal, "keyvault storage failed")
}

// createAttempts bounds the rounds of a create that keeps losing races.
const createAttempts = 5

func (s *jetStreamStore) key(ctx context.Context, kctx, entity string, hash []byte, create bool) ([]byte, string, error) {
	subj := keySubj(kctx, hash)
	for range createAttempts {
		msg, err := s.last(ctx, subj)
		if err == nil {
			return s.openKey(kctx, entity, hash, msg.Data)
		}
		if !msgNotFound(err) {
			return nil, "", s.internal("read key", err)
		}
		rec, err := s.tombstone(ctx, kctx, entity, hash)
		if err != nil {
			return nil, "", err
		}
		switch {
		case rec != nil:
			return nil, "", forgottenError(entity, rec)
		case entity == "":
			return nil, "", kuma.Errorf(kuma.CodeNotFound, "no key for that pseudonym")
		case !create:
			return nil, "", kuma.Errorf(kuma.CodeNotFound, "no key for entity %q", entity)
		}
		dek := envelope.NewRandomKey()
		plain, _ := json.Marshal(sealedKey{Entity: entity, Key: dek, CreatedAt: s.now().UnixNano()})
		err = s.create(ctx, subj, s.kek.Seal(nil, plain, keyAAD(kctx, hash)))
		if wrongLastSeq(err) {
			continue // another instance created it: read the winner
		}
		if err != nil {
			return nil, "", s.internal("create key", err)
		}
		// A shred may have written its tombstone after the look above and
		// erased before this write: then this key must not live. A shred
		// whose tombstone comes after this write erases it itself.
		rec, err = s.tombstone(ctx, kctx, entity, hash)
		if err != nil {
			return nil, "", err
		}
		if rec != nil {
			if err := s.erase(ctx, subj); err != nil {
				return nil, "", err
			}
			return nil, "", forgottenError(entity, rec)
		}
		return dek, entity, nil
	}
	return nil, "", kuma.Errorf(kuma.CodeUnavailable, "keyvault: the key of %q is being created and erased concurrently; retry", entity)
}

func (s *jetStreamStore) openKey(kctx, entity string, hash, sealed []byte) ([]byte, string, error) {
	plain, err := s.kek.Open(sealed, keyAAD(kctx, hash))
	var k sealedKey
	if err == nil {
		err = json.Unmarshal(plain, &k)
	}
	if err != nil || len(k.Key) != envelope.KeySize || entity != "" && k.Entity != entity {
		s.log.Error("wrapped key does not open", "context", kctx, "id_hash", hexHash(hash), "err", err)
		return nil, "", kuma.Errorf(kuma.CodeInternal, "internal error")
	}
	return k.Key, k.Entity, nil
}

func (s *jetStreamStore) tombstone(ctx context.Context, kctx, entity string, hash []byte) (*kuma.ForgetReply, error) {
	msg, err := s.last(ctx, tombSubj(hash))
	if msgNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, s.internal("read tombstone", err)
	}
	var t tombstone
	if err := json.Unmarshal(msg.Data, &t); err != nil {
		return nil, s.internal("read tombstone", err)
	}
	return &kuma.ForgetReply{Entity: entity, ForgottenAt: time.Unix(0, t.At).UTC(), EventsDeleted: t.EventsDeleted}, nil
}

func (s *jetStreamStore) forgotten(ctx context.Context, kctx, entity string, hash []byte) (*kuma.ForgetReply, error) {
	return s.tombstone(ctx, kctx, entity, hash)
}

// shred writes the tombstone first, then erases every message of the key:
// a create that races it sees the tombstone after its own write (see key).
// The erase runs on every shred, also of a forgotten id, so a forget that
// failed half-way (tombstone written, key not yet erased) completes when it
// is retried.
func (s *jetStreamStore) shred(ctx context.Context, kctx, entity string, hash []byte, r vaultclient.ShredRequest) (*kuma.ForgetReply, bool, error) {
	rec, err := s.tombstone(ctx, kctx, entity, hash)
	if err != nil {
		return nil, false, err
	}
	fresh := false
	if rec == nil {
		b, _ := json.Marshal(tombstone{At: r.At.UnixNano(), EventsDeleted: r.EventsDeleted, Reason: r.Reason, RequestedBy: r.RequestedBy})
		err := s.create(ctx, tombSubj(hash), b)
		switch {
		case err == nil:
			fresh = true
			rec = &kuma.ForgetReply{Entity: entity, ForgottenAt: r.At, EventsDeleted: r.EventsDeleted}
		case wrongLastSeq(err): // another instance forgot it first: its record stands
			if rec, err = s.tombstone(ctx, kctx, entity, hash); err != nil {
				return nil, false, err
			}
			if rec == nil {
				return nil, false, kuma.Errorf(kuma.CodeUnavailable, "keyvault: the tombstone of %q is being written; retry", entity)
			}
		default:
			return nil, false, s.internal("write tombstone", err)
		}
	}
	if err := s.erase(ctx, keySubj(kctx, hash)); err != nil {
		return nil, false, err
	}
	return rec, fresh, nil
}

// eraseRounds bounds erase: a subject holds at most keysHistory messages.
const eraseRounds = keysHistory + 8

// erase securely deletes every message of a subject, newest first: the
// server overwrites each one's bytes with random ones in every replica's
// block file (see docs/cluster.md for what the Raft log keeps, and for how
// long).
func (s *jetStreamStore) erase(ctx context.Context, subj string) error {
	for range eraseRounds {
		msg, err := s.last(ctx, subj)
		if msgNotFound(err) {
			return nil
		}
		if err != nil {
			return s.internal("find key to erase", err)
		}
		_, err = retried(ctx, func(ctx context.Context) (struct{}, error) {
			return struct{}{}, s.st.SecureDeleteMsg(ctx, msg.Sequence)
		})
		if err != nil {
			// Two instances erasing one key at once: the loser's delete
			// fails (with the server's answer as text only, "sequence N
			// not found"), and the message is gone, which is what counts.
			if _, gerr := retried(ctx, func(ctx context.Context) (*jetstream.RawStreamMsg, error) { return s.st.GetMsg(ctx, msg.Sequence) }); !msgNotFound(gerr) {
				return s.internal("erase key", err)
			}
		}
	}
	return kuma.Errorf(kuma.CodeUnavailable, "keyvault: the key of a forgotten entity keeps being written; retry")
}

// close has nothing to finish: every operation is a request that ends
// with its caller's.
func (s *jetStreamStore) close() error { return nil }
