// Package envelope seals and opens Kuma's data at rest with AES-256-GCM.
//
// Every sealed value is bound to where it belongs by its associated data
// (context, entity, purpose, version): a ciphertext copied to another entity
// or version fails to open instead of being read as the wrong data. Nonces
// are random (96 bits), so a retried commit that reuses a version never
// reuses a nonce. Data keys are per entity; they are wrapped under the master
// key with the same construction.
package envelope

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
)

// KeySize is the size of every key: AES-256.
const KeySize = 32

const (
	formatV1  byte = 1
	nonceSize      = 12
	tagSize        = 16
	// Overhead is what sealing adds to a plaintext.
	Overhead = 1 + nonceSize + tagSize
)

// ErrOpen is returned for any ciphertext that does not open: tampered, moved
// to another place, or sealed under another key. It says nothing more, on
// purpose.
var ErrOpen = errors.New("envelope: ciphertext does not open (tampered, misplaced or wrong key)")

// Purpose separates the kinds of sealed values so that one can never be
// opened as another.
type Purpose byte

// Purposes.
const (
	PurposeEvent    Purpose = 'e'
	PurposeSnapshot Purpose = 's'
	PurposeDataKey  Purpose = 'k'
	PurposeMeta     Purpose = 'm'
)

// AAD builds the associated data that binds a sealed value to its place.
// Lengths are prefixed so that no two different places encode alike.
func AAD(purpose Purpose, context, entity string, version int64) []byte {
	return AppendAAD(make([]byte, 0, 16+len(context)+len(entity)), purpose, context, entity, version)
}

// AppendAAD appends what AAD returns to b: the append path writes the
// associated data of all of an append's events into one buffer.
func AppendAAD(b []byte, purpose Purpose, context, entity string, version int64) []byte {
	b = append(b, 'k', 'u', 'm', 'a', 1, byte(purpose))
	b = binary.AppendUvarint(b, uint64(len(context)))
	b = append(b, context...)
	b = binary.AppendUvarint(b, uint64(len(entity)))
	b = append(b, entity...)
	b = binary.BigEndian.AppendUint64(b, uint64(version))
	return b
}

// Key is a ready AES-256-GCM key. It is safe for concurrent use.
type Key struct{ aead cipher.AEAD }

// NewKey prepares a 32-byte key.
func NewKey(raw []byte) (*Key, error) {
	if len(raw) != KeySize {
		return nil, fmt.Errorf("envelope: key must be %d bytes, got %d", KeySize, len(raw))
	}
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &Key{aead: aead}, nil
}

// NewRandomKey returns 32 random bytes for a new key.
func NewRandomKey() []byte {
	k := make([]byte, KeySize)
	_, _ = rand.Read(k) // never fails (crypto/rand panics rather than return short)
	return k
}

// Seal returns format || nonce || ciphertext+tag, appended to dst.
func (k *Key) Seal(dst, plaintext, aad []byte) []byte {
	var nonce [nonceSize]byte
	_, _ = rand.Read(nonce[:])
	return k.sealWithNonce(dst, nonce[:], plaintext, aad)
}

func (k *Key) sealWithNonce(dst, nonce, plaintext, aad []byte) []byte {
	dst = append(dst, formatV1)
	dst = append(dst, nonce...)
	return k.aead.Seal(dst, nonce, plaintext, aad)
}

// SealBatch seals several plaintexts with one call for their nonces, which is
// what the append path uses: one random read per batch, not per event.
func (k *Key) SealBatch(plaintexts, aads [][]byte) [][]byte {
	nonces := make([]byte, nonceSize*len(plaintexts))
	_, _ = rand.Read(nonces)
	// One buffer holds every sealed value (each capped, so that appending
	// to one cannot write over the next): one allocation per batch, not
	// one per event.
	total := 0
	for _, p := range plaintexts {
		total += len(p) + Overhead
	}
	buf := make([]byte, 0, total)
	out := make([][]byte, len(plaintexts))
	for i, p := range plaintexts {
		start := len(buf)
		buf = k.sealWithNonce(buf, nonces[i*nonceSize:(i+1)*nonceSize], p, aads[i])
		out[i] = buf[start:len(buf):len(buf)]
	}
	return out
}

// Open authenticates and decrypts a sealed value.
func (k *Key) Open(sealed, aad []byte) ([]byte, error) {
	if len(sealed) < Overhead || sealed[0] != formatV1 {
		return nil, ErrOpen
	}
	nonce := sealed[1 : 1+nonceSize]
	out, err := k.aead.Open(nil, nonce, sealed[1+nonceSize:], aad)
	if err != nil {
		return nil, ErrOpen
	}
	return out, nil
}

// EncodeEvent packs an event's type and data into one plaintext, so both are
// sealed together: uvarint(len(type)) || type || data.
func EncodeEvent(typ string, data []byte) []byte {
	return AppendEvent(make([]byte, 0, binary.MaxVarintLen16+len(typ)+len(data)), typ, data)
}

// AppendEvent appends what EncodeEvent returns to b.
func AppendEvent(b []byte, typ string, data []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(typ)))
	b = append(b, typ...)
	return append(b, data...)
}

// DecodeEvent unpacks what EncodeEvent packed.
func DecodeEvent(b []byte) (typ string, data []byte, err error) {
	n, w := binary.Uvarint(b)
	if w <= 0 || n > uint64(len(b)-w) {
		return "", nil, errors.New("envelope: malformed event plaintext")
	}
	return string(b[w : w+int(n)]), b[w+int(n):], nil
}
