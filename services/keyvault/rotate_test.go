package keyvault_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
)

// --- rotate ------------------------------------------------------------------

func TestRotate(t *testing.T) {
	path := dbPath(t)
	keyA, keyB := envelope.NewRandomKey(), envelope.NewRandomKey()
	kv := startVault(t, path, keyA, nil)
	want := map[[2]string][]byte{}
	for _, c := range []string{"default", "payments"} {
		for i := range 10 {
			e := fmt.Sprintf("user_%d", i)
			want[[2]string{c, e}] = mustKey(t, kv, c, e, true)
		}
	}
	rec, err := kv.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "user_3", EventsDeleted: 2, At: fixedNow})
	if err != nil {
		t.Fatal(err)
	}
	delete(want, [2]string{"default", "user_3"})
	stopVault(t, kv)

	n, err := keyvault.Rotate(t.Context(), path, keyA, keyB)
	if err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	if n != len(want) {
		t.Errorf("Rotate: got %d keys, want %d", n, len(want))
	}

	old := newVault(t, path, keyA, nil, nil)
	if err := old.Start(t.Context()); err == nil {
		_ = old.Stop(context.Background())
		t.Fatal("Start with the old master key after Rotate: got nil, want an error")
	} else if !strings.Contains(err.Error(), "master key") {
		t.Errorf("Start with the old master key: got %q, want it to mention the master key", err)
	}
	_ = old.Stop(context.Background())

	kv2 := startVault(t, path, keyB, nil)
	for ce, k := range want {
		if got := mustKey(t, kv2, ce[0], ce[1], false); !bytes.Equal(got, k) {
			t.Errorf("%s/%s under the new master key: got %x, want %x", ce[0], ce[1], got, k)
		}
	}
	_, err = kv2.DataKey(t.Context(), "default", "user_3", true)
	wantCode(t, "DataKey of a shredded entity after Rotate", err, kuma.ErrEntityForgotten)
	got, err := kv2.Forgotten(t.Context(), "default", "user_3")
	if err != nil || got == nil || !got.ForgottenAt.Equal(rec.ForgottenAt) || got.EventsDeleted != rec.EventsDeleted {
		t.Errorf("Forgotten after Rotate: got %+v, %v; want %+v", got, err, rec)
	}
	// New keys work under the new master key.
	mustKey(t, kv2, "default", "after-rotate", true)
}

func TestRotateWithWrongOldKeyChangesNothing(t *testing.T) {
	path := dbPath(t)
	keyA := envelope.NewRandomKey()
	kv := startVault(t, path, keyA, nil)
	k := mustKey(t, kv, "default", "user_1", true)
	stopVault(t, kv)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	n, err := keyvault.Rotate(t.Context(), path, envelope.NewRandomKey(), envelope.NewRandomKey())
	if err == nil {
		t.Fatalf("Rotate with a wrong old key: got %d keys and nil, want an error", n)
	}
	if n != 0 {
		t.Errorf("Rotate with a wrong old key: got %d keys, want 0", n)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("Rotate with a wrong old key changed the file")
	}
	kv2 := startVault(t, path, keyA, nil)
	if got := mustKey(t, kv2, "default", "user_1", false); !bytes.Equal(got, k) {
		t.Errorf("after a failed Rotate: got %x, want %x", got, k)
	}
}

func TestRotateRefusesBadInput(t *testing.T) {
	path := dbPath(t)
	keyA := envelope.NewRandomKey()
	kv := startVault(t, path, keyA, nil)
	mustKey(t, kv, "default", "user_1", true)
	stopVault(t, kv)

	if _, err := keyvault.Rotate(t.Context(), path, keyA[:16], envelope.NewRandomKey()); err == nil {
		t.Error("Rotate with a 16-byte old key: got nil, want an error")
	}
	if _, err := keyvault.Rotate(t.Context(), path, keyA, make([]byte, 31)); err == nil {
		t.Error("Rotate with a 31-byte new key: got nil, want an error")
	}
	missing := filepath.Join(t.TempDir(), "missing.db")
	if _, err := keyvault.Rotate(t.Context(), missing, keyA, envelope.NewRandomKey()); err == nil {
		t.Error("Rotate of a missing file: got nil, want an error")
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Rotate of a missing file created it (stat: %v)", err)
	}
	// The refusals left the vault under keyA.
	startVault(t, path, keyA, nil)
}
