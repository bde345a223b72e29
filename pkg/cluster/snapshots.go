package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Snapshot describes a shard file uploaded to the object store.
type Snapshot struct {
	Context   string
	Shard     int
	Node      string // who uploaded it
	Epoch     int64  // the lease epoch it was written under
	LastSeq   int64  // last position in the file
	Published int64  // position the stream held when it was taken
	// StreamSeq is the stream sequence of the shard subject's last message
	// when it was taken: a catch-up reads the stream from the next one.
	StreamSeq uint64
	Bytes     int64

	// object and nuid name the copy SnapshotInfo found, which
	// GetSnapshot downloads.
	object, nuid string
}

// A shard's snapshot lives under one of two object names, taken in turn:
// the new copy is uploaded beside the old one, and only then are the old
// one's chunks erased. The object store's own replace (Put on the same name)
// purges the old chunks, and a purged message stays in its block file until
// the block is compacted: an old copy would keep a forgotten entity's rows
// (its id, its times) on disk long after the copy that replaced it. An
// erased message is overwritten in place. With two names the newest copy is
// whole at every moment: a crash leaves at most an older one beside it,
// which the next upload erases first.
func snapshotName(kctx string, shard int) string {
	return kctx + "/shard-" + strconv.Itoa(shard)
}

func snapshotNames(kctx string, shard int) [2]string {
	n := snapshotName(kctx, shard)
	return [2]string{n, n + ".b"}
}

// generationKey orders the two copies: each upload takes the newest's plus
// one (a copy from before there were two names has none: 0).
const generationKey = "generation"

func generation(info *jetstream.ObjectInfo) uint64 {
	g, _ := strconv.ParseUint(info.Metadata[generationKey], 10, 64)
	return g
}

// copies returns the shard's whole snapshot objects, the newest first, and
// those whose chunks are not all in the store (broken). An upload whose
// last acknowledgement was lost ends with the object store purging its
// chunks, while its meta message may have landed: that meta names a copy
// that is not there, and it is the newest by generation. Read, it would
// fail every take of the shard; its name is the next upload's target.
func (s *Store) copies(ctx context.Context, kctx string, shard int) (whole, broken []*jetstream.ObjectInfo, err error) {
	for _, name := range snapshotNames(kctx, shard) {
		info, err := s.snaps.GetInfo(ctx, name)
		if errors.Is(err, jetstream.ErrObjectNotFound) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("cluster: snapshot of %s shard %d: %w", kctx, shard, err)
		}
		if info.Deleted {
			continue
		}
		ok, err := s.complete(ctx, info)
		if err != nil {
			return nil, nil, fmt.Errorf("cluster: snapshot of %s shard %d: %w", kctx, shard, err)
		}
		if ok {
			whole = append(whole, info)
		} else {
			broken = append(broken, info)
		}
	}
	if len(whole) == 2 && newer(whole[1], whole[0]) {
		whole[0], whole[1] = whole[1], whole[0]
	}
	return whole, broken, nil
}

// newer reports whether copy a is newer than copy b.
func newer(a, b *jetstream.ObjectInfo) bool {
	return generation(a) > generation(b) || generation(a) == generation(b) && a.ModTime.After(b.ModTime)
}

// complete reports whether every chunk of a snapshot object is in the store.
func (s *Store) complete(ctx context.Context, info *jetstream.ObjectInfo) (bool, error) {
	if info.Chunks == 0 {
		return true, nil
	}
	subject := chunkSubject(SnapshotsBucket, info)
	si, err := s.snapStream.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		return false, err
	}
	return si.State.Subjects[subject] == uint64(info.Chunks), nil
}

func chunkSubject(bucket string, info *jetstream.ObjectInfo) string {
	return "$O." + bucket + ".C." + info.NUID
}

// eraseChunks overwrites every chunk of a snapshot object in the store's
// block files (SecureDeleteMsg). The server rewrites a message's whole block
// to erase it, so this takes a while for a large copy: tens of milliseconds
// per 128 KiB chunk.
func (s *Store) eraseChunks(ctx context.Context, info *jetstream.ObjectInfo) error {
	if err := eraseObjectChunks(ctx, s.snapStream, SnapshotsBucket, info); err != nil {
		return fmt.Errorf("cluster: erase snapshot %s: %w", info.Name, err)
	}
	return nil
}

// eraseObjectChunks overwrites every chunk of an object of bucket (whose
// stream is stream) in the server's block files.
func eraseObjectChunks(ctx context.Context, stream jetstream.Stream, bucket string, info *jetstream.ObjectInfo) error {
	subject := chunkSubject(bucket, info)
	for seq := uint64(1); ; {
		m, err := stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subject))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.SecureDeleteMsg(ctx, m.Sequence); err != nil && !msgGone(err) {
			return err
		}
		seq = m.Sequence + 1
	}
}

// msgGone tells whether a delete failed only because the message is gone
// already: another erase of the same chunks got there first (the background
// erase of a replaced copy, and the upload that replaces that copy's name
// next). The server answers that as a generic deletion failure (10057)
// whose text is its store's "no message found", and nats.go passes it on as
// ErrMsgDeleteUnsuccessful with the server's error as text only.
func msgGone(err error) bool {
	return errors.Is(err, jetstream.ErrMsgNotFound) ||
		(errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) && strings.Contains(err.Error(), "err_code=10057") && strings.Contains(err.Error(), "no message found"))
}

// erase erases a snapshot object's chunks, then marks it deleted.
func (s *Store) erase(ctx context.Context, info *jetstream.ObjectInfo) error {
	if err := s.eraseChunks(ctx, info); err != nil {
		return err
	}
	if err := s.snaps.Delete(ctx, info.Name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("cluster: delete snapshot %s: %w", info.Name, err)
	}
	return nil
}

// eraseInBackground erases the chunks of a copy that a newer one replaced,
// off the caller's path (an upload during a hand-off must not wait for it).
// Its object entry stays: it is the older of the two, never read, and the
// next upload replaces it. Only the chunks: deleting the entry by name here
// could delete a newer copy another node has put under that name since.
func (s *Store) eraseInBackground(info *jetstream.ObjectInfo) {
	s.erasing.Add(1)
	go func() {
		defer s.erasing.Done()
		if err := s.eraseChunks(s.eraseCtx, info); err != nil && s.eraseCtx.Err() == nil {
			s.cfg.Logger.Warn("cluster: erasing a replaced snapshot failed; the next upload of the shard tries again",
				"snapshot", info.Name, "err", err)
		}
	}()
}

// sweepSnapshots erases, in the background, the older copy of every shard
// that has two: an erase a stop or a crash cut short.
func (s *Store) sweepSnapshots() {
	s.erasing.Add(1)
	go func() {
		defer s.erasing.Done()
		ctx := s.eraseCtx
		infos, err := s.snaps.List(ctx)
		if errors.Is(err, jetstream.ErrNoObjectsFound) || ctx.Err() != nil {
			return
		}
		if err != nil {
			s.cfg.Logger.Warn("cluster: listing snapshots to erase old copies failed", "err", err)
			return
		}
		newest := map[string]*jetstream.ObjectInfo{}
		var older []*jetstream.ObjectInfo
		for _, info := range infos {
			if info.Deleted {
				continue
			}
			whole, err := s.complete(ctx, info)
			if err != nil {
				if ctx.Err() == nil {
					s.cfg.Logger.Warn("cluster: reading snapshots to erase old copies failed", "err", err)
				}
				return // erase nothing unsure of which copy is the newest whole one
			}
			base := strings.TrimSuffix(info.Name, ".b")
			cur, ok := newest[base]
			switch {
			case !whole:
				older = append(older, info) // whatever of its chunks landed late
			case !ok:
				newest[base] = info
			case newer(info, cur):
				newest[base] = info
				older = append(older, cur)
			default:
				older = append(older, info)
			}
		}
		for _, info := range older {
			if err := s.eraseChunks(ctx, info); err != nil && ctx.Err() == nil {
				s.cfg.Logger.Warn("cluster: erasing an old snapshot failed", "snapshot", info.Name, "err", err)
			}
		}
	}()
}

// PutSnapshot uploads the (closed or consistent) shard copy at path, then
// erases the copy it replaces. An attempt that fails short of ctx (a lost
// acknowledgement while the stream changes leaders or replicas) is made
// again under the same name.
func (s *Store) PutSnapshot(ctx context.Context, path string, sn Snapshot) error {
	whole, broken, err := s.copies(ctx, sn.Context, sn.Shard)
	if err != nil {
		return err
	}
	names := snapshotNames(sn.Context, sn.Shard)
	target, gen := names[0], uint64(1)
	if len(whole) > 0 && whole[0].Name == names[0] {
		target = names[1]
	}
	all := append(whole, broken...)
	for _, o := range all {
		gen = max(gen, generation(o)+1)
	}
	// The older copy under the target name goes first, whatever of it the
	// background erase after the last upload has not reached (a stop, a
	// crash, or that erase still running); the newest stays whole meanwhile.
	for _, o := range all {
		if o.Name == target {
			if err := s.eraseChunks(ctx, o); err != nil {
				return err
			}
		}
	}
	meta := jetstream.ObjectMeta{
		Name:        target,
		Description: "Kuma shard file",
		Metadata: map[string]string{
			"node":        s.cfg.Node,
			"epoch":       strconv.FormatInt(sn.Epoch, 10),
			"last_seq":    strconv.FormatInt(sn.LastSeq, 10),
			"published":   strconv.FormatInt(sn.Published, 10),
			"stream_seq":  strconv.FormatUint(sn.StreamSeq, 10),
			generationKey: strconv.FormatUint(gen, 10),
		},
	}
	for attempt := 1; ; attempt++ {
		err = s.putOnce(ctx, path, meta)
		if err == nil {
			break
		}
		if ctx.Err() != nil || attempt == putAttempts {
			return err
		}
		s.cfg.Logger.Warn("cluster: a snapshot upload failed; trying again", "snapshot", target, "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
		}
	}
	for _, o := range all {
		if o.Name != target {
			s.eraseInBackground(o)
		}
	}
	return nil
}

// putAttempts bounds the tries of one upload; ctx bounds their time.
const putAttempts = 5

// putOnce uploads the file at path as one object. The object store sets a
// timeout on each chunk's acknowledgement only when its context has no
// deadline; under a move's deadline one acknowledgement that never comes (a
// stream changing leaders or replicas) held the upload, and the shard
// unserved, for the whole move. So the put runs under a context that ends
// with ctx but has no deadline, and a lost acknowledgement fails it within
// the client's request timeout, for PutSnapshot to try again.
func (s *Store) putOnce(ctx context.Context, path string, meta jetstream.ObjectMeta) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cluster: upload snapshot: %w", err)
	}
	defer f.Close()
	pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	defer context.AfterFunc(ctx, cancel)()
	if _, err := s.snaps.Put(pctx, meta, f); err != nil {
		return fmt.Errorf("cluster: upload snapshot of %s: %w", meta.Name, err)
	}
	return nil
}

// SnapshotInfo returns the shard's latest uploaded snapshot, if any.
func (s *Store) SnapshotInfo(ctx context.Context, kctx string, shard int) (Snapshot, bool, error) {
	live, _, err := s.copies(ctx, kctx, shard)
	if err != nil || len(live) == 0 {
		return Snapshot{}, false, err
	}
	info := live[0]
	md := info.Metadata
	num := func(k string) int64 { n, _ := strconv.ParseInt(md[k], 10, 64); return n }
	ss, _ := strconv.ParseUint(md["stream_seq"], 10, 64)
	return Snapshot{Context: kctx, Shard: shard, Node: md["node"], Epoch: num("epoch"), LastSeq: num("last_seq"),
		Published: num("published"), StreamSeq: ss, Bytes: int64(info.Size), object: info.Name, nuid: info.NUID}, true, nil
}

// ErrSnapshotReplaced is what GetSnapshot answers when the copy described
// was replaced by a newer upload meanwhile: ask SnapshotInfo again.
var ErrSnapshotReplaced = errors.New("cluster: the snapshot was replaced by a newer upload while it was being read; ask for it again")

// GetSnapshot downloads to path the very copy that SnapshotInfo described
// (the object store checks its digest), so that what a take decided from
// the description is what it gets; it answers ErrSnapshotReplaced if that
// copy has been replaced since.
func (s *Store) GetSnapshot(ctx context.Context, snap Snapshot, path string) (err error) {
	fail := func(err error) error {
		return fmt.Errorf("cluster: download snapshot of %s shard %d: %w", snap.Context, snap.Shard, err)
	}
	if snap.object == "" {
		return fail(jetstream.ErrObjectNotFound)
	}
	res, err := s.snaps.Get(ctx, snap.object)
	if err != nil {
		if errors.Is(err, jetstream.ErrObjectNotFound) {
			return fail(ErrSnapshotReplaced)
		}
		return fail(err)
	}
	defer res.Close()
	if info, err := res.Info(); err != nil {
		return fail(err)
	} else if info.NUID != snap.nuid {
		return fail(ErrSnapshotReplaced)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fail(err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fail(cerr)
		}
		if err != nil {
			_ = os.Remove(path)
		}
	}()
	// The digest is checked when the last chunk has been read.
	if _, err := io.Copy(f, res); err != nil {
		return fail(err)
	}
	return nil
}

// DeleteSnapshot erases a shard's snapshots (a forgotten entity's rows must
// not outlive the forget in an old copy).
func (s *Store) DeleteSnapshot(ctx context.Context, kctx string, shard int) error {
	whole, broken, err := s.copies(ctx, kctx, shard)
	if err != nil {
		return err
	}
	for _, o := range append(whole, broken...) {
		if err := s.erase(ctx, o); err != nil {
			return err
		}
	}
	return nil
}
