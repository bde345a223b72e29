package keyvault_test

import (
	"bytes"
	"database/sql"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
)

// TestPseudonyms: a key is found by the pseudonym its DataKey reply names,
// with its id; the pseudonym depends on context and id and is not the id;
// after the shred the pseudonym leads to entity_forgotten and its forget
// record (without the id), a pseudonym of no entity is not_found, a
// malformed one bad_request.
func TestPseudonyms(t *testing.T) {
	forBothPaths(t, func(t *testing.T, api keyAPI, _ *keyvault.Service) {
		ctx := t.Context()
		a, err := api.DataKey(ctx, "default", "user_a", true)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := api.DataKey(ctx, "default", "user_b", true)
		other, _ := api.DataKey(ctx, "payments", "user_a", true)
		if a.Pseudonym == "" || a.Pseudonym == b.Pseudonym || a.Pseudonym == other.Pseudonym || strings.Contains(a.Pseudonym, "user_a") {
			t.Fatalf("pseudonyms %q, %q (other context %q): want distinct, and not the id", a.Pseudonym, b.Pseudonym, other.Pseudonym)
		}
		ps, err := api.Pseudonyms(ctx, "default", []string{"user_b", "user_a", "never_created"})
		if err != nil || len(ps) != 3 || ps[0] != b.Pseudonym || ps[1] != a.Pseudonym || ps[2] == "" {
			t.Fatalf("Pseudonyms = %q, %v; want those of the DataKey replies, in order", ps, err)
		}
		byP, err := api.KeyByPseudonym(ctx, "default", a.Pseudonym)
		if err != nil || byP.Entity != "user_a" || !bytes.Equal(byP.Key, a.Key) {
			t.Fatalf("KeyByPseudonym = %+v, %v; want user_a's key", byP, err)
		}
		// A pseudonym is of one context.
		_, err = api.KeyByPseudonym(ctx, "payments", a.Pseudonym)
		wantCode(t, "KeyByPseudonym in another context", err, kuma.ErrNotFound)
		_, err = api.KeyByPseudonym(ctx, "default", ps[2])
		wantCode(t, "KeyByPseudonym of no entity", err, kuma.ErrNotFound)
		for _, bad := range []string{"user_a", "!!!", strings.Repeat("A", 44)} {
			_, err = api.KeyByPseudonym(ctx, "default", bad)
			wantCode(t, "KeyByPseudonym("+bad+")", err, kuma.ErrBadRequest)
			_, err = api.ForgottenPseudonym(ctx, "default", bad)
			wantCode(t, "ForgottenPseudonym("+bad+")", err, kuma.ErrBadRequest)
		}
		if _, err := api.Pseudonyms(ctx, "default", []string{"ok", "bad id\n"}); err == nil {
			t.Fatal("Pseudonyms of an invalid id: no error")
		}
		if rec, err := api.ForgottenPseudonym(ctx, "default", a.Pseudonym); rec != nil || err != nil {
			t.Fatalf("ForgottenPseudonym of a live entity = %+v, %v; want nil", rec, err)
		}

		if _, err := api.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: "user_a", EventsDeleted: 2, At: fixedNow}); err != nil {
			t.Fatal(err)
		}
		_, err = api.KeyByPseudonym(ctx, "default", a.Pseudonym)
		wantCode(t, "KeyByPseudonym after the shred", err, kuma.ErrEntityForgotten)
		if err != nil && strings.Contains(err.Error(), "user_a") {
			t.Fatalf("the error names the forgotten id: %v", err)
		}
		rec, err := api.ForgottenPseudonym(ctx, "default", a.Pseudonym)
		if err != nil || rec == nil || rec.EventsDeleted != 2 || rec.Entity != "" {
			t.Fatalf("ForgottenPseudonym after the shred = %+v, %v; want the record, without the id", rec, err)
		}
		if ps, _ := api.Pseudonyms(ctx, "default", []string{"user_a"}); len(ps) != 1 || ps[0] != a.Pseudonym {
			t.Fatalf("the pseudonym of a forgotten id changed: %q", ps)
		}
		if byP, err := api.KeyByPseudonym(ctx, "default", b.Pseudonym); err != nil || byP.Entity != "user_b" {
			t.Fatalf("the other entity by pseudonym after the shred: %+v, %v", byP, err)
		}
	})
}

// TestPseudonymsOfKeysCreatedBefore: a keyvault file written before
// pseudonyms (no id_hash column) is migrated at start: its keys are found by
// pseudonym.
func TestPseudonymsOfKeysCreatedBefore(t *testing.T) {
	path, master := dbPath(t), envelope.NewRandomKey()
	kv := startVault(t, path, master, nil)
	old := mustKey(t, kv, "default", "user_old", true)
	stopVault(t, kv)
	// Make the file what an older keyvault left: no id_hash column.
	db, err := sql.Open("sqlite", sqlite.DSN(path))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`DROP INDEX keys_id_hash`, `ALTER TABLE keys DROP COLUMN id_hash`} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()

	kv = startVault(t, path, master, nil)
	ps, err := kv.Pseudonyms(t.Context(), "default", []string{"user_old"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := kv.KeyByPseudonym(t.Context(), "default", ps[0])
	if err != nil || r.Entity != "user_old" || !bytes.Equal(r.Key, old) {
		t.Fatalf("key created before pseudonyms, by pseudonym: %+v, %v", r, err)
	}
}
