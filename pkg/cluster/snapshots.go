package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"

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
}

func snapshotName(kctx string, shard int) string {
	return kctx + "/shard-" + strconv.Itoa(shard)
}

// PutSnapshot uploads the (closed or consistent) shard copy at path.
func (s *Store) PutSnapshot(ctx context.Context, path string, sn Snapshot) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cluster: upload snapshot: %w", err)
	}
	defer f.Close()
	meta := jetstream.ObjectMeta{
		Name:        snapshotName(sn.Context, sn.Shard),
		Description: "Kuma shard file",
		Metadata: map[string]string{
			"node":       s.cfg.Node,
			"epoch":      strconv.FormatInt(sn.Epoch, 10),
			"last_seq":   strconv.FormatInt(sn.LastSeq, 10),
			"published":  strconv.FormatInt(sn.Published, 10),
			"stream_seq": strconv.FormatUint(sn.StreamSeq, 10),
		},
	}
	if _, err := s.snaps.Put(ctx, meta, f); err != nil {
		return fmt.Errorf("cluster: upload snapshot of %s: %w", meta.Name, err)
	}
	return nil
}

// SnapshotInfo returns the shard's latest uploaded snapshot, if any.
func (s *Store) SnapshotInfo(ctx context.Context, kctx string, shard int) (Snapshot, bool, error) {
	info, err := s.snaps.GetInfo(ctx, snapshotName(kctx, shard))
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return Snapshot{}, false, nil
	}
	if err != nil {
		return Snapshot{}, false, fmt.Errorf("cluster: snapshot of %s shard %d: %w", kctx, shard, err)
	}
	if info.Deleted {
		return Snapshot{}, false, nil
	}
	md := info.Metadata
	num := func(k string) int64 { n, _ := strconv.ParseInt(md[k], 10, 64); return n }
	ss, _ := strconv.ParseUint(md["stream_seq"], 10, 64)
	return Snapshot{Context: kctx, Shard: shard, Node: md["node"], Epoch: num("epoch"), LastSeq: num("last_seq"),
		Published: num("published"), StreamSeq: ss, Bytes: int64(info.Size)}, true, nil
}

// GetSnapshot downloads the shard's snapshot to path (the object store
// checks its digest).
func (s *Store) GetSnapshot(ctx context.Context, kctx string, shard int, path string) error {
	if err := s.snaps.GetFile(ctx, snapshotName(kctx, shard), path); err != nil {
		return fmt.Errorf("cluster: download snapshot of %s shard %d: %w", kctx, shard, err)
	}
	return nil
}

// DeleteSnapshot removes a shard's snapshot (a forgotten entity's rows must
// not outlive the forget in an old copy).
func (s *Store) DeleteSnapshot(ctx context.Context, kctx string, shard int) error {
	err := s.snaps.Delete(ctx, snapshotName(kctx, shard))
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil
	}
	return err
}
