package shardnode

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// The shard's part of `kuma backup` (kuma.ShardBackupSubject): its owner
// makes a consistent copy of the shard file (VACUUM INTO on a connection of
// its own: one read snapshot, commits go on) and uploads it to the backup
// object store, from where the command downloads and erases it. The
// failover snapshots (KUMA_SNAPSHOTS) are not touched.

// backupTimeout bounds one shard's copy and upload.
const backupTimeout = 5 * time.Minute

// BackupObjectName is the object a backup's copy of a shard is uploaded
// under: <id>/<ctx>/shard-NNN.db.
func BackupObjectName(id, kctx string, shard int) string {
	return fmt.Sprintf("%s/%s/shard-%03d.db", id, kctx, shard)
}

// serveBackup answers one shard backup request. It runs on its own
// goroutine, at most one per node at a time (backupSlots): a copy reads
// the whole file.
func (sh *shard) serveBackup(msg *nats.Msg) {
	out, err := sh.backup(msg.Data)
	code := "ok"
	if err != nil {
		code = string(kuma.ErrorCode(err))
		err = natsbus.RespondError(sh.nc, msg, err)
	} else {
		err = natsbus.RespondJSON(sh.nc, msg, out)
	}
	sh.metrics.requests.WithLabelValues("backup", code).Inc()
	if err != nil {
		sh.logger.Warn("backup reply failed", "shard", sh.n, "err", err)
	}
}

func (sh *shard) backup(body []byte) (*kuma.BackupReply, error) {
	var r kuma.BackupRequest
	if err := kuma.Decode(body, &r); err != nil {
		return nil, err
	}
	if !kuma.ValidBackupID(r.ID) {
		return nil, kuma.Errorf(kuma.CodeBadRequest, "backup id %q: want 1 to 64 letters, digits, '-' or '_'", r.ID)
	}
	ctx, cancel := context.WithTimeout(sh.checkCtx, backupTimeout)
	defer cancel()
	select {
	case sh.backupSlots <- struct{}{}:
		defer func() { <-sh.backupSlots }()
	case <-ctx.Done():
		return nil, kuma.Errorf(kuma.CodeUnavailable, "shard %d of %q is stopping; retry", sh.n, sh.cc.Name)
	}
	tmp := shardPath(sh.dataDir, sh.cc.Name, sh.n) + ".backup-" + r.ID
	_ = os.Remove(tmp)
	defer os.Remove(tmp)
	info, err := sh.store.Backup(ctx, tmp)
	if err != nil {
		sh.logger.Error("backup copy failed", "context", sh.cc.Name, "shard", sh.n, "err", err)
		return nil, kuma.Errorf(kuma.CodeInternal, "the copy of shard %d failed", sh.n)
	}
	obj, err := cluster.PutBackup(ctx, sh.js, BackupObjectName(r.ID, sh.cc.Name, sh.n), tmp)
	if err != nil {
		sh.logger.Warn("backup upload failed", "context", sh.cc.Name, "shard", sh.n, "err", err)
		return nil, kuma.Errorf(kuma.CodeUnavailable, "the upload of shard %d's copy failed; retry", sh.n)
	}
	sh.logger.Info("backup copy uploaded", "context", sh.cc.Name, "shard", sh.n, "object", obj.Name,
		"bytes", obj.Bytes, "last_seq", info.LastSeq)
	return &kuma.BackupReply{Object: obj.Name, Bytes: obj.Bytes, SHA256: obj.SHA256,
		LastSeq: info.LastSeq, Published: info.Published}, nil
}
