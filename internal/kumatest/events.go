package kumatest

import (
	"database/sql"
	"testing"

	"github.com/kumadb/kuma/pkg/sqlite"
)

// runOf reads the row of a shard file (opened with database/sql) that
// holds entity's event at version: rows hold runs of events (pkg/sqlite's
// runs.go).
func runOf(t testing.TB, db *sql.DB, entity string, version int64) (pos, last int64, payloads [][]byte) {
	t.Helper()
	var n int64
	var payload []byte
	err := db.QueryRow(`SELECT pos, version, n, payload FROM events WHERE entity = ? AND version >= ? ORDER BY version LIMIT 1`,
		entity, version).Scan(&pos, &last, &n, &payload)
	if err != nil {
		t.Fatalf("the row holding %s's version %d: %v", entity, version, err)
	}
	if last-n+1 > version {
		t.Fatalf("no row holds %s's version %d", entity, version)
	}
	payloads, err = sqlite.SplitRun(payload, n)
	if err != nil {
		t.Fatal(err)
	}
	return pos, last, payloads
}

// EventPayload returns the sealed payload of entity's event at version,
// read from a shard file directly.
func EventPayload(t testing.TB, db *sql.DB, entity string, version int64) []byte {
	t.Helper()
	_, last, ps := runOf(t, db, entity, version)
	return ps[int64(len(ps))-1-(last-version)]
}

// SetEventPayload replaces the sealed payload of entity's event at version
// in a shard file, as damage or an attacker with the file would.
func SetEventPayload(t testing.TB, db *sql.DB, entity string, version int64, payload []byte) {
	t.Helper()
	pos, last, ps := runOf(t, db, entity, version)
	ps[int64(len(ps))-1-(last-version)] = payload
	if _, err := db.Exec(`UPDATE events SET payload = ? WHERE pos = ?`, sqlite.FrameRun(ps), pos); err != nil {
		t.Fatal(err)
	}
}
