package sqlite

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// A shard file, its -wal and -shm, its folder and a backup copy are private
// under the usual umask, and an older, wider file is narrowed on open.
func TestShardFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "ctx")
	path := filepath.Join(dir, "shard-000.db")
	s := openTest(t, path, 1)
	if err := s.Commit(ctx, commitOf("a", 1, 1, time.Now())); err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(t.TempDir(), "copy.db")
	if _, err := s.Backup(ctx, backup); err != nil {
		t.Fatal(err)
	}
	want := map[string]os.FileMode{dir: 0o700, path: 0o600, path + "-wal": 0o600, path + "-shm": 0o600, backup: 0o600}
	for p, m := range want {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != m {
			t.Errorf("%s has mode %v, want %v", filepath.Base(p), st.Mode().Perm(), m)
		}
	}
	s.Close()

	for _, p := range []string{path, dir} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s = openTest(t, path, 1)
	defer s.Close()
	for _, p := range []string{path, dir} {
		if st, _ := os.Stat(p); st.Mode().Perm() != want[p] {
			t.Errorf("after reopen %s has mode %v, want %v", filepath.Base(p), st.Mode().Perm(), want[p])
		}
	}
}
