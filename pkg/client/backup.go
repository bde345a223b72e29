package client

import (
	"context"
	"strconv"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// BackupShard asks the owner of a shard of the client's context for a
// consistent copy of its file, uploaded to the object store KUMA_BACKUPS
// under a name made of id (kuma.ShardBackupSubject; admin only). The
// caller downloads the object and erases it (pkg/cluster GetBackup).
func (c *Client) BackupShard(ctx context.Context, shard int, id string) (*kuma.BackupReply, error) {
	var out kuma.BackupReply
	if err := c.request(ctx, "backup", "shard "+strconv.Itoa(shard), kuma.ShardBackupSubject(c.opts.Context, shard),
		kuma.BackupRequest{ID: id}, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// BackupKeyvault asks the keyvault for a consistent copy of its file, as
// BackupShard does; the reply carries the master key's fingerprint.
func (c *Client) BackupKeyvault(ctx context.Context, id string) (*kuma.BackupReply, error) {
	var out kuma.BackupReply
	if err := c.request(ctx, "backup", "keyvault", vaultclient.SubjectBackup, kuma.BackupRequest{ID: id}, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Tombstones returns a page of the keyvault's forgotten ids, by pseudonym,
// after the pseudonym after ("" from the first).
func (c *Client) Tombstones(ctx context.Context, after string, limit int) (*kuma.TombstonesReply, error) {
	var out kuma.TombstonesReply
	if err := c.request(ctx, "tombstones", "keyvault", vaultclient.SubjectTombstones,
		kuma.TombstonesRequest{After: after, Limit: limit}, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
