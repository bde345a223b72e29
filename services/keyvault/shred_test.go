package keyvault_test

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
)

// --- shred -----------------------------------------------------------------

func TestShred(t *testing.T) {
	forBothPaths(t, func(t *testing.T, api keyAPI, _ *keyvault.Service) {
		ctx := t.Context()
		mustKey(t, api, "default", "victim", true)
		other := mustKey(t, api, "default", "bystander", true)
		sameIDOtherCtx := mustKey(t, api, "payments", "victim", true)

		at := time.Date(2026, 11, 25, 14, 3, 7, 123456789, time.FixedZone("X", -5*3600))
		wantAt := time.Date(2026, 11, 25, 19, 3, 7, 123456000, time.UTC)
		rec, err := api.Shred(ctx, vaultclient.ShredRequest{
			Context: "default", Entity: "victim", Reason: "GDPR art. 17", RequestedBy: "dpo@example.com",
			EventsDeleted: 7, At: at,
		})
		if err != nil {
			t.Fatalf("Shred: got error %v, want a record", err)
		}
		if rec.Entity != "victim" {
			t.Errorf("Shred: got Entity %q, want %q", rec.Entity, "victim")
		}
		if !rec.ForgottenAt.Equal(wantAt) || rec.ForgottenAt.Location() != time.UTC {
			t.Errorf("Shred: got ForgottenAt %v, want %v (At truncated to µs, UTC)", rec.ForgottenAt, wantAt)
		}
		if rec.EventsDeleted != 7 {
			t.Errorf("Shred: got EventsDeleted %d, want 7", rec.EventsDeleted)
		}

		for _, create := range []bool{true, false} {
			k, err := api.DataKey(ctx, "default", "victim", create)
			wantCode(t, fmt.Sprintf("DataKey(create=%v) after shred", create), err, kuma.ErrEntityForgotten)
			if k.Key != nil {
				t.Errorf("DataKey(create=%v) after shred: got key %x, want none", create, k)
			}
		}

		got, err := api.Forgotten(ctx, "default", "victim")
		if err != nil || got == nil {
			t.Fatalf("Forgotten(victim): got %+v, %v; want the record", got, err)
		}
		if got.Entity != rec.Entity || !got.ForgottenAt.Equal(rec.ForgottenAt) || got.EventsDeleted != rec.EventsDeleted {
			t.Errorf("Forgotten(victim): got %+v, want %+v", got, rec)
		}

		again, err := api.Shred(ctx, vaultclient.ShredRequest{
			Context: "default", Entity: "victim", Reason: "again", RequestedBy: "someone-else",
			EventsDeleted: 99, At: at.Add(48 * time.Hour),
		})
		if err != nil {
			t.Fatalf("second Shred: got error %v, want the first record", err)
		}
		if again.Entity != rec.Entity || !again.ForgottenAt.Equal(rec.ForgottenAt) || again.EventsDeleted != rec.EventsDeleted {
			t.Errorf("second Shred: got %+v, want the first record %+v", again, rec)
		}

		if got, err := api.Forgotten(ctx, "default", "bystander"); err != nil || got != nil {
			t.Errorf("Forgotten(bystander): got %+v, %v; want nil, nil", got, err)
		}
		if got, err := api.Forgotten(ctx, "default", "never-seen"); err != nil || got != nil {
			t.Errorf("Forgotten(never-seen): got %+v, %v; want nil, nil", got, err)
		}
		if got, err := api.Forgotten(ctx, "payments", "victim"); err != nil || got != nil {
			t.Errorf("Forgotten(payments/victim): got %+v, %v; want nil, nil (contexts are separate)", got, err)
		}
		if got := mustKey(t, api, "default", "bystander", false); !bytes.Equal(got, other) {
			t.Errorf("bystander's key after shredding victim: got %x, want %x", got, other)
		}
		if got := mustKey(t, api, "payments", "victim", false); !bytes.Equal(got, sameIDOtherCtx) {
			t.Errorf("payments/victim's key after shredding default/victim: got %x, want %x", got, sameIDOtherCtx)
		}
	})
}

// TestShredOfKeylessEntity pins the keyvault's own behaviour: it does not
// know which ids were written (the shardnode answers not_found for those), so
// a shred of an id without a key still records it as forgotten, and no key
// can be created for it afterwards.
func TestShredOfKeylessEntity(t *testing.T) {
	forBothPaths(t, func(t *testing.T, api keyAPI, _ *keyvault.Service) {
		ctx := t.Context()
		rec, err := api.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: "ghost", At: fixedNow})
		if err != nil {
			t.Fatalf("Shred(ghost): got error %v, want a record", err)
		}
		if rec.Entity != "ghost" || rec.EventsDeleted != 0 {
			t.Errorf("Shred(ghost): got %+v, want entity ghost, 0 events", rec)
		}
		_, err = api.DataKey(ctx, "default", "ghost", true)
		wantCode(t, "DataKey(create=true) after shredding a keyless id", err, kuma.ErrEntityForgotten)
	})
}

func TestShredWithoutAtUsesTheClock(t *testing.T) {
	forBothPaths(t, func(t *testing.T, api keyAPI, _ *keyvault.Service) {
		mustKey(t, api, "default", "e1", true)
		rec, err := api.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "e1", EventsDeleted: 3})
		if err != nil {
			t.Fatalf("Shred: %v", err)
		}
		want := fixedNow.UTC().Truncate(time.Microsecond)
		if !rec.ForgottenAt.Equal(want) {
			t.Errorf("Shred without At: got ForgottenAt %v, want the clock's %v", rec.ForgottenAt, want)
		}
	})
}

func TestShredReasonLength(t *testing.T) {
	forBothPaths(t, func(t *testing.T, api keyAPI, _ *keyvault.Service) {
		ctx := t.Context()
		key := mustKey(t, api, "default", "long-reason", true)

		// Too long: refused, and nothing changes.
		tooLong := strings.Repeat("é", kuma.MaxForgetReasonLen+1)
		_, err := api.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: "long-reason", Reason: tooLong, At: fixedNow})
		wantCode(t, fmt.Sprintf("Shred with a %d-character reason", kuma.MaxForgetReasonLen+1), err, kuma.ErrBadRequest)
		if rec, err := api.Forgotten(ctx, "default", "long-reason"); err != nil || rec != nil {
			t.Fatalf("Forgotten after a refused shred: got %+v, %v; want nil, nil", rec, err)
		}
		if got := mustKey(t, api, "default", "long-reason", false); !bytes.Equal(got, key) {
			t.Fatalf("key after a refused shred: got %x, want %x", got, key)
		}

		// Exactly the limit, in characters (not bytes): accepted.
		atLimit := strings.Repeat("é", kuma.MaxForgetReasonLen)
		if _, err := api.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: "long-reason", Reason: atLimit, At: fixedNow}); err != nil {
			t.Fatalf("Shred with a %d-character (%d-byte) reason: got %v, want success", kuma.MaxForgetReasonLen, len(atLimit), err)
		}
	})
}

func TestShredBroadcast(t *testing.T) {
	nc := startNATS(t)
	kv := startVault(t, dbPath(t), envelope.NewRandomKey(), nc)
	cl := vaultclient.New(nc, 0)
	sub, err := nc.SubscribeSync(vaultclient.SubjectShredded)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	next := func() vaultclient.Shredded {
		t.Helper()
		msg, err := sub.NextMsgWithContext(t.Context())
		if err != nil {
			t.Fatalf("waiting for %s: %v", vaultclient.SubjectShredded, err)
		}
		var got vaultclient.Shredded
		if err := json.Unmarshal(msg.Data, &got); err != nil {
			t.Fatalf("broadcast %q: %v", msg.Data, err)
		}
		return got
	}
	ctx := t.Context()
	mustKey(t, cl, "payments", "acct-1", true)

	// A refused shred broadcasts nothing: the first message is the next
	// successful shred's.
	if _, err := cl.Shred(ctx, vaultclient.ShredRequest{Context: "payments", Entity: "refused",
		Reason: strings.Repeat("x", kuma.MaxForgetReasonLen+1)}); err == nil {
		t.Fatal("Shred with a too-long reason: got success, want bad_request")
	}
	if _, err := cl.Shred(ctx, vaultclient.ShredRequest{Context: "payments", Entity: "acct-1", At: fixedNow}); err != nil {
		t.Fatalf("Shred over NATS: %v", err)
	}
	if got, want := next(), (vaultclient.Shredded{Context: "payments", Entity: "acct-1"}); got != want {
		t.Errorf("broadcast after shred over NATS: got %+v, want %+v", got, want)
	}
	// The in-process path broadcasts too (key caches of other processes).
	if _, err := kv.Shred(ctx, vaultclient.ShredRequest{Context: "default", Entity: "local-1", At: fixedNow}); err != nil {
		t.Fatalf("Shred in process: %v", err)
	}
	if got, want := next(), (vaultclient.Shredded{Context: "default", Entity: "local-1"}); got != want {
		t.Errorf("broadcast after in-process shred: got %+v, want %+v", got, want)
	}
}

func TestShredAgainWritesNoSecondAuditRow(t *testing.T) {
	path := dbPath(t)
	kv := startVault(t, path, envelope.NewRandomKey(), nil)
	for range 3 {
		if _, err := kv.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "twice", Reason: "r", At: fixedNow}); err != nil {
			t.Fatal(err)
		}
	}
	stopVault(t, kv)
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, table := range []string{"audit", "shredded"} {
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM ` + table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Errorf("%s rows after three shreds of one id: got %d, want 1", table, n)
		}
	}
}

// TestShredAtOutsideUnixNanoRange: the record a shred returns must be the
// one stored. ops.go stores forgotten_at as UnixNano, which is undefined
// outside 1678..2262, so the first reply says one time and every later
// Forgotten/Shred another (2300-01-01 comes back as 1715-06-13). Refusing
// such an At with bad_request would also be right.
func TestShredAtOutsideUnixNanoRange(t *testing.T) {
	kv := startVault(t, dbPath(t), envelope.NewRandomKey(), nil)
	for i, at := range []time.Time{
		time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(1600, 1, 1, 0, 0, 0, 0, time.UTC),
	} {
		e := fmt.Sprintf("far_%d", i)
		rec, err := kv.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: e, At: at})
		if errors.Is(err, kuma.ErrBadRequest) {
			continue
		}
		if err != nil {
			t.Fatalf("Shred(At %v): got %v, want a record or bad_request", at, err)
		}
		got, err := kv.Forgotten(t.Context(), "default", e)
		if err != nil || got == nil {
			t.Fatalf("Forgotten: got %+v, %v; want the record", got, err)
		}
		if !got.ForgottenAt.Equal(rec.ForgottenAt) || !rec.ForgottenAt.Equal(at) {
			t.Errorf("At %v: Shred replied ForgottenAt %v, Forgotten got %v; want both %v", at, rec.ForgottenAt, got.ForgottenAt, at)
		}
	}
}
