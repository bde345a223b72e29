// Package damage bends files on purpose, for the tests that prove Kuma
// notices: the corruption tests of the shard files (pkg/sqlite) and of the
// shardnode that serves them. It imports nothing of Kuma's, so any test may
// use it without an import cycle.
package damage

import (
	"os"
	"testing"
)

// Flip XORs the byte at off of the file at path with mask.
func Flip(t testing.TB, path string, off int64, mask byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := []byte{0}
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= mask
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}
