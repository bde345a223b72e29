package sqlite

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// File modes of what holds data: shard files hold entity ids and times in
// clear, read models hold event data in clear, so only the process's own
// user may read them.
const (
	PrivateDirMode  fs.FileMode = 0o700
	PrivateFileMode fs.FileMode = 0o600
)

// PrepareFile makes sure the database at path and its folder exist with
// private modes before SQLite opens it. SQLite creates a new database with
// mode 0644 (less the umask) and gives its -wal and -shm files the mode of
// the database, so a database created here 0600 keeps all three private.
// A file or folder an older Kuma made wider is narrowed.
func PrepareFile(path string) error {
	dir := filepath.Dir(path)
	if err := PrepareDir(dir); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, PrivateFileMode)
	if err != nil {
		return fmt.Errorf("sqlite: create %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("sqlite: create %s: %w", path, err)
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := narrow(p, PrivateFileMode); err != nil {
			return err
		}
	}
	return nil
}

// PrepareDir creates dir (and any missing parent) with mode 0700, and
// narrows it to 0700 when it exists wider.
func PrepareDir(dir string) error {
	if err := os.MkdirAll(dir, PrivateDirMode); err != nil {
		return fmt.Errorf("sqlite: create folder %s: %w", dir, err)
	}
	return narrow(dir, PrivateDirMode)
}

// MakePrivate narrows an existing file to 0600 (a folder to 0700), for the
// files beside the databases that are not opened through PrepareFile; a
// missing path is left missing.
func MakePrivate(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return narrow(path, PrivateFileMode) // a missing path: nil
	}
	if st.IsDir() {
		return narrow(path, PrivateDirMode)
	}
	return narrow(path, PrivateFileMode)
}

// narrow takes from path's mode any permission beyond want; a missing path
// is left missing.
func narrow(path string, want fs.FileMode) error {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sqlite: %w", err)
	}
	if st.Mode().Perm()&^want == 0 {
		return nil
	}
	if err := os.Chmod(path, st.Mode().Perm()&want); err != nil {
		return fmt.Errorf("sqlite: narrow the mode of %s: %w", path, err)
	}
	return nil
}
