package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// BackupsBucket is the object store that carries the files of a `kuma
// backup` from the nodes that make them to the command that downloads them.
// It is apart from SnapshotsBucket, so a backup never touches the copies
// moves and failover rely on. An object lives only between its upload and
// its download: the command erases it (its chunks overwritten, as a
// replaced snapshot's are) once it has it, so no backup stays in the
// cluster. One replica is enough for that while: a lost object fails the
// backup, which is then run again.
const BackupsBucket = "KUMA_BACKUPS"

// BackupObject is one uploaded backup file.
type BackupObject struct {
	Name   string // object name in BackupsBucket
	Bytes  int64
	SHA256 string // hex, of the file's bytes
}

// backups opens (creating it if need be) the backup bucket and its stream.
func backups(ctx context.Context, js jetstream.JetStream) (jetstream.ObjectStore, error) {
	obs, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket: BackupsBucket, Description: "Kuma backups in transit (kuma backup); erased once downloaded",
		Storage: jetstream.FileStorage, Replicas: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: object store %s: %w", BackupsBucket, err)
	}
	return obs, nil
}

// PutBackup uploads the file at path under name and returns its size and
// checksum. Safe for concurrent use with distinct names.
func PutBackup(ctx context.Context, js jetstream.JetStream, name, path string) (BackupObject, error) {
	obs, err := backups(ctx, js)
	if err != nil {
		return BackupObject{}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return BackupObject{}, fmt.Errorf("cluster: upload backup %s: %w", name, err)
	}
	defer f.Close()
	h := sha256.New()
	info, err := obs.Put(ctx, jetstream.ObjectMeta{Name: name, Description: "Kuma backup file"}, io.TeeReader(f, h))
	if err != nil {
		return BackupObject{}, fmt.Errorf("cluster: upload backup %s: %w", name, err)
	}
	return BackupObject{Name: name, Bytes: int64(info.Size), SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// GetBackup downloads the object name to path, a new file created 0600
// (the object store checks its digest), then erases it from the bucket:
// chunks overwritten, entry deleted.
// The download is kept even if the erase fails; the error says so.
func GetBackup(ctx context.Context, js jetstream.JetStream, name, path string) error {
	obs, err := js.ObjectStore(ctx, BackupsBucket)
	if err != nil {
		return fmt.Errorf("cluster: object store %s: %w", BackupsBucket, err)
	}
	if err := download(ctx, obs, name, path); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("cluster: download backup %s: %w", name, err)
	}
	return EraseBackup(ctx, js, name)
}

// download writes the object to a new private file (0600; the object
// store's GetFile would create it 0644), synced. The object reader checks
// the digest at its end.
func download(ctx context.Context, obs jetstream.ObjectStore, name, path string) error {
	r, err := obs.Get(ctx, name)
	if err != nil {
		return err
	}
	defer r.Close()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// EraseBackup overwrites the chunks of the object name and deletes it. A
// missing object is not an error.
func EraseBackup(ctx context.Context, js jetstream.JetStream, name string) error {
	obs, err := js.ObjectStore(ctx, BackupsBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cluster: object store %s: %w", BackupsBucket, err)
	}
	info, err := obs.GetInfo(ctx, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cluster: erase backup %s: %w", name, err)
	}
	stream, err := js.Stream(ctx, "OBJ_"+BackupsBucket)
	if err != nil {
		return fmt.Errorf("cluster: object store %s: %w", BackupsBucket, err)
	}
	if !info.Deleted {
		if err := eraseObjectChunks(ctx, stream, BackupsBucket, info); err != nil {
			return fmt.Errorf("cluster: erase backup %s: %w", name, err)
		}
	}
	if err := obs.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("cluster: erase backup %s: %w", name, err)
	}
	return nil
}

// EraseBackups erases every object whose name starts with prefix: what a
// backup cut short left behind. It returns how many it erased.
func EraseBackups(ctx context.Context, js jetstream.JetStream, prefix string) (int, error) {
	obs, err := js.ObjectStore(ctx, BackupsBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("cluster: object store %s: %w", BackupsBucket, err)
	}
	infos, err := obs.List(ctx)
	if errors.Is(err, jetstream.ErrNoObjectsFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("cluster: list %s: %w", BackupsBucket, err)
	}
	n := 0
	for _, info := range infos {
		if info.Deleted || !strings.HasPrefix(info.Name, prefix) {
			continue
		}
		if err := EraseBackup(ctx, js, info.Name); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
