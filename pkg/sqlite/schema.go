package sqlite

// schemaVersion is bumped with every change to schema below; Open refuses a
// file written by a newer Kuma and upgrades an older one (upgradeSchema).
// 2: events rows hold runs (the n column, runs.go).
const schemaVersion = 2

// Times are unix nanoseconds (UTC). pos is the shard's commit sequence: the
// writer assigns it, so it is dense (1, 2, 3...) and orders events exactly as
// they were committed, which is what positions and the outbox rely on.
//
// meta holds the file's identity (schema, context, shard, shards), the lease
// epoch, whole_of (the newest epoch whose whole history the file holds,
// replica.go), the published position, and high_water: the highest position the
// file ever held, kept apart from the rows because a forget deletes them
// (forget.go). A key added here needs no schema version.
const schema = `
CREATE TABLE IF NOT EXISTS meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
) WITHOUT ROWID;

-- A row is a run of n events of one entity (runs.go): pos and version are
-- its last event's, payload holds each event's type and data, sealed under
-- the entity's key (framed when n > 1).
CREATE TABLE IF NOT EXISTS events (
	pos     INTEGER PRIMARY KEY,
	entity  TEXT    NOT NULL,
	version INTEGER NOT NULL,
	payload BLOB    NOT NULL,
	time    INTEGER NOT NULL,
	n       INTEGER NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX IF NOT EXISTS events_entity_version ON events (entity, version);

CREATE TABLE IF NOT EXISTS entities (
	entity     TEXT    PRIMARY KEY,
	version    INTEGER NOT NULL,
	created_at INTEGER NOT NULL,
	updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS snapshots (
	entity     TEXT    NOT NULL,
	version    INTEGER NOT NULL,
	state      BLOB    NOT NULL,
	updated_at INTEGER NOT NULL,
	PRIMARY KEY (entity, version)
) WITHOUT ROWID;

-- A forget in progress: written before the key is shredded, removed with the
-- entity's rows, so a restart finishes any forget a crash interrupted.
CREATE TABLE IF NOT EXISTS forget_pending (
	entity       TEXT    PRIMARY KEY,
	reason       TEXT    NOT NULL,
	requested_by TEXT    NOT NULL,
	requested_at INTEGER NOT NULL
) WITHOUT ROWID;

-- key is the SHA-256 of the client's key (IdempotencyDigest); files from
-- before that hold it in clear, and lookups accept both.
CREATE TABLE IF NOT EXISTS idempotency (
	entity        TEXT    NOT NULL,
	key           TEXT    NOT NULL,
	first_version INTEGER NOT NULL,
	last_version  INTEGER NOT NULL,
	time          INTEGER NOT NULL,
	pos           INTEGER NOT NULL, -- of the batch's last event
	PRIMARY KEY (entity, key)
) WITHOUT ROWID;
-- The relay finds the key of a batch's last event by position.
CREATE INDEX IF NOT EXISTS idempotency_pos ON idempotency (pos);
`
