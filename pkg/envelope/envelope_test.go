package envelope

import (
	"bytes"
	"errors"
	"testing"
)

func mustKey(t testing.TB) *Key {
	k, err := NewKey(NewRandomKey())
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSealOpenAndMisplacement(t *testing.T) {
	k := mustKey(t)
	aad := AAD(PurposeEvent, "default", "user-1", 3)
	sealed := k.Seal(nil, []byte("secret marker"), aad)
	if bytes.Contains(sealed, []byte("secret marker")) {
		t.Fatal("plaintext visible in the sealed value")
	}
	got, err := k.Open(sealed, aad)
	if err != nil || string(got) != "secret marker" {
		t.Fatalf("Open = %q, %v", got, err)
	}
	for name, other := range map[string][]byte{
		"other entity":  AAD(PurposeEvent, "default", "user-2", 3),
		"other version": AAD(PurposeEvent, "default", "user-1", 4),
		"other context": AAD(PurposeEvent, "payments", "user-1", 3),
		"other purpose": AAD(PurposeSnapshot, "default", "user-1", 3),
		// Length prefixes keep these apart although the bytes concatenate alike.
		"shifted names": AAD(PurposeEvent, "defaultu", "ser-1", 3),
	} {
		if _, err := k.Open(sealed, other); !errors.Is(err, ErrOpen) {
			t.Errorf("%s: Open = %v, want ErrOpen", name, err)
		}
	}
	if _, err := mustKey(t).Open(sealed, aad); !errors.Is(err, ErrOpen) {
		t.Errorf("other key: Open = %v, want ErrOpen", err)
	}
	for i := range sealed {
		bad := bytes.Clone(sealed)
		bad[i] ^= 0x40
		if _, err := k.Open(bad, aad); !errors.Is(err, ErrOpen) {
			t.Fatalf("flipped byte %d: Open = %v, want ErrOpen", i, err)
		}
	}
	if _, err := k.Open(sealed[:len(sealed)-1], aad); !errors.Is(err, ErrOpen) {
		t.Fatal("truncated value opened")
	}
}

func TestSealBatchUsesDistinctNonces(t *testing.T) {
	k := mustKey(t)
	pts := [][]byte{[]byte("a"), []byte("a"), []byte("a")}
	aads := [][]byte{AAD(PurposeEvent, "c", "e", 1), AAD(PurposeEvent, "c", "e", 1), AAD(PurposeEvent, "c", "e", 1)}
	out := k.SealBatch(pts, aads)
	if bytes.Equal(out[0], out[1]) || bytes.Equal(out[1][1:13], out[2][1:13]) {
		t.Fatal("equal plaintexts sealed alike: nonces repeat")
	}
	for i := range out {
		if got, err := k.Open(out[i], aads[i]); err != nil || string(got) != "a" {
			t.Fatalf("open %d = %q, %v", i, got, err)
		}
	}
}

// The sealed values of a batch share one buffer: each must stay its own
// value when the caller appends to another.
func TestSealBatchValuesAreSeparate(t *testing.T) {
	k := mustKey(t)
	pts := [][]byte{[]byte("first"), []byte("second"), []byte("third")}
	aads := [][]byte{AppendAAD(nil, PurposeEvent, "c", "e", 1), AAD(PurposeEvent, "c", "e", 2), AAD(PurposeEvent, "c", "e", 3)}
	out := k.SealBatch(pts, aads)
	_ = append(out[0], "overwrite"...)
	_ = append(out[1], "overwrite"...)
	for i := range out {
		if got, err := k.Open(out[i], aads[i]); err != nil || !bytes.Equal(got, pts[i]) {
			t.Fatalf("open %d after appending to the others = %q, %v", i, got, err)
		}
	}
	if !bytes.Equal(AppendAAD([]byte("x"), PurposeEvent, "c", "e", 1)[1:], AAD(PurposeEvent, "c", "e", 1)) {
		t.Fatal("AppendAAD does not append what AAD returns")
	}
}

func TestEventEncoding(t *testing.T) {
	for _, tc := range []struct{ typ, data string }{{"UserCreated", `{"a":1}`}, {"E", ``}, {"X.y:z-1", `null`}} {
		typ, data, err := DecodeEvent(EncodeEvent(tc.typ, []byte(tc.data)))
		if err != nil || typ != tc.typ || string(data) != tc.data {
			t.Fatalf("round trip of %+v = %q %q %v", tc, typ, data, err)
		}
	}
	for _, bad := range [][]byte{nil, {0x80}, {5, 'a'}} {
		if _, _, err := DecodeEvent(bad); err == nil {
			t.Fatalf("DecodeEvent(%v) accepted", bad)
		}
	}
}

// FuzzOpen feeds arbitrary bytes to the open path: it must never panic and
// never open anything that was not sealed with this key and place.
func FuzzOpen(f *testing.F) {
	raw := bytes.Repeat([]byte{7}, KeySize)
	k, _ := NewKey(raw)
	aad := AAD(PurposeEvent, "default", "user-1", 1)
	valid := k.sealWithNonce(nil, make([]byte, nonceSize), EncodeEvent("UserCreated", []byte(`{"a":1}`)), aad)
	f.Add(valid, []byte(nil))
	f.Add([]byte{}, []byte("x"))
	f.Add([]byte{formatV1}, aad)
	f.Fuzz(func(t *testing.T, sealed, otherAAD []byte) {
		out, err := k.Open(sealed, aad)
		if err == nil && !bytes.Equal(sealed, valid) {
			// Only a genuine seal opens; the fuzzer cannot forge a tag.
			if _, _, derr := DecodeEvent(out); derr != nil && len(out) > 0 {
				t.Fatalf("opened a forged value %x", sealed)
			}
		}
		if err != nil && !errors.Is(err, ErrOpen) {
			t.Fatalf("Open error %v is not ErrOpen", err)
		}
		if _, err := k.Open(sealed, otherAAD); err == nil && !bytes.Equal(otherAAD, aad) {
			t.Fatalf("opened under foreign associated data %x", otherAAD)
		}
		_, _, _ = DecodeEvent(sealed)
	})
}

func BenchmarkSealBatch100(b *testing.B) {
	k := mustKey(b)
	pts := make([][]byte, 100)
	aads := make([][]byte, 100)
	for i := range pts {
		pts[i] = EncodeEvent("UserUpdated", bytes.Repeat([]byte("x"), 200))
		aads[i] = AAD(PurposeEvent, "default", "user-1", int64(i+1))
	}
	b.ReportAllocs()
	for b.Loop() {
		k.SealBatch(pts, aads)
	}
}
