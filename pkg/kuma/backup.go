package kuma

import "regexp"

// Backups (kuma backup, an admin request): the command asks each shard's
// owner, and the keyvault, for a consistent copy of its file. The copy is
// uploaded to the JetStream object store KUMA_BACKUPS under a name the
// request's id makes unique, and the command downloads and erases it.

// ShardBackupSubject is where a shard's owner makes a backup copy of the
// shard file: _kuma.<ctx>.shard.<n>.backup. Admin only (kuma.conf: ops).
func ShardBackupSubject(ctx string, shard int) string { return ShardPrefix(ctx, shard) + "backup" }

// BackupRequest asks for a backup copy. ID is the backup's id, the first
// part of the uploaded object's name.
type BackupRequest struct {
	ID string `json:"id"`
}

var backupID = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidBackupID reports whether id can name a backup: 1 to 64 letters,
// digits, '-' or '_'.
func ValidBackupID(id string) bool { return backupID.MatchString(id) }

// BackupReply describes one uploaded backup file.
type BackupReply struct {
	Object string `json:"object"` // name in the object store KUMA_BACKUPS
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"` // hex, of the file's bytes
	// A shard's copy: its last position (the sequence within the shard)
	// and the position the stream held when it was made.
	LastSeq   int64 `json:"last_seq,omitempty"`
	Published int64 `json:"published,omitempty"`
	// MasterKeyFingerprint (the keyvault's copy) names the master key the
	// copy's keys are wrapped under, by a keyed hash, never the key.
	MasterKeyFingerprint string `json:"master_key_fingerprint,omitempty"`
}

// Tombstone is one forgotten id as the keyvault remembers it: by its
// pseudonym (the base64url keyed hash of the context and id), never the id.
type Tombstone struct {
	Pseudonym     string `json:"pseudonym"`
	ForgottenAt   int64  `json:"forgotten_at"` // unix nanoseconds
	EventsDeleted int64  `json:"events_deleted"`
}

// TombstonesRequest asks for a page of a keyvault's forgotten ids, in the
// order of their pseudonyms, after After ("" from the first).
type TombstonesRequest struct {
	After string `json:"after,omitempty"`
	Limit int    `json:"limit"`
}

// MaxTombstonesPage bounds the tombstones of one reply.
const MaxTombstonesPage = 10_000

// TombstonesReply is a page of forgotten ids; Next is the After of the
// following page, "" after the last.
type TombstonesReply struct {
	Tombstones []Tombstone `json:"tombstones"`
	Next       string      `json:"next,omitempty"`
}
