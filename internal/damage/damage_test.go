package damage

import (
	"os"
	"path/filepath"
	"testing"
)

func TestFlipChangesOneByteAndBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte{0x0d, 0x00, 0xff}, 0o600); err != nil {
		t.Fatal(err)
	}
	Flip(t, path, 0, 0x01)
	if b, _ := os.ReadFile(path); string(b) != "\x0c\x00\xff" {
		t.Fatalf("after one flip: % x", b)
	}
	Flip(t, path, 0, 0x01)
	if b, _ := os.ReadFile(path); string(b) != "\x0d\x00\xff" {
		t.Fatalf("after flipping back: % x", b)
	}
}
