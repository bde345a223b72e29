package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"syscall"

	msqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// ErrCorrupt matches (errors.Is) a commit refused because the shard file was
// found damaged, and a failed Check. IsCorrupt also recognises SQLite's own
// corruption errors, which are not wrapped.
var ErrCorrupt = errors.New("sqlite: the shard file is corrupt")

// IsCorrupt reports whether err says the file is damaged: ErrCorrupt, or
// SQLite's SQLITE_CORRUPT (a page that does not parse) or SQLITE_NOTADB (a
// file header that does not). Retrying cannot help; the file must be
// restored.
func IsCorrupt(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, ErrCorrupt) {
		return true
	}
	switch resultCode(err) {
	case sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB:
		return true
	}
	return false
}

// IsFull reports whether err is a write refused for lack of space
// (SQLITE_FULL, which SQLite returns for ENOSPC, or ENOSPC itself). The
// transaction was rolled back: nothing of it was stored, and the same write
// succeeds once space is freed.
func IsFull(err error) bool {
	if err == nil {
		return false
	}
	return resultCode(err) == sqlite3.SQLITE_FULL || errors.Is(err, syscall.ENOSPC)
}

// resultCode is the primary SQLite result code in err's chain (0: none).
func resultCode(err error) int {
	var se *msqlite.Error
	if errors.As(err, &se) {
		return se.Code() & 0xff // an extended code carries the primary one in its low byte
	}
	return 0
}

// Corrupt returns the first corruption error any read, write or Check of
// this shard met, or nil. Once set it stays: the file is not trusted again
// until it is reopened (restored).
func (s *Shard) Corrupt() error {
	s.corruptMu.Lock()
	defer s.corruptMu.Unlock()
	return s.corruptErr
}

// noteErr records err when it says the file is damaged, and calls
// Config.OnCorrupt the first time. It returns err unchanged, so a call site
// reads return s.noteErr(err).
func (s *Shard) noteErr(err error) error {
	if !IsCorrupt(err) {
		return err
	}
	s.corruptMu.Lock()
	first := s.corruptErr == nil
	if first {
		s.corruptErr = err
	}
	s.corruptMu.Unlock()
	if first && s.cfg.OnCorrupt != nil {
		s.cfg.OnCorrupt(err)
	}
	return err
}

// refuseIfCorrupt is what Commit answers once the file is known damaged:
// writing more into a broken b-tree can spread the damage.
func (s *Shard) refuseIfCorrupt() error {
	if err := s.Corrupt(); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return nil
}

// Check runs PRAGMA quick_check over the whole file: every page of every
// b-tree is read and its structure verified (not that indexes match their
// tables, which integrity_check adds at about twice the cost). It reads one
// consistent snapshot on a connection of its own, without mmap, so the
// readers and the writer go on meanwhile. Its cost grows with the file: 0.4 s
// for 118 MB in the OS cache (about 300 MB/s; BenchmarkQuickCheck100MB), up to
// twice that cold, on this project's 2-core machine; so a node with sixteen
// 1 GB shards would start about a minute later if it ran before serving, and
// the shardnode runs it in the background after a shard opens instead. A damaged file marks the
// shard corrupt (Corrupt, Config.OnCorrupt) and returns an error matching
// ErrCorrupt; a cancelled ctx returns ctx's error and marks nothing.
func (s *Shard) Check(ctx context.Context) error {
	problems, err := quickCheck(ctx, s.cfg.Path)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if IsCorrupt(err) { // quick_check itself could not read a page
			return s.noteErr(fmt.Errorf("%w: quick_check of shard %d: %w", ErrCorrupt, s.cfg.Shard, err))
		}
		return fmt.Errorf("sqlite: check of shard %d: %w", s.cfg.Shard, err)
	}
	if len(problems) > 0 {
		return s.noteErr(fmt.Errorf("%w: quick_check of shard %d: %s", ErrCorrupt, s.cfg.Shard, strings.Join(problems, "; ")))
	}
	return nil
}

// maxCheckProblems bounds what Check reports of a badly damaged file.
const maxCheckProblems = 10

// quickCheck returns quick_check's findings (none: the file is sound).
func quickCheck(ctx context.Context, path string) ([]string, error) {
	db, err := sql.Open("sqlite", DSN(path, "busy_timeout(10000)", "query_only(1)"))
	if err != nil {
		return nil, err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, fmt.Sprintf(`PRAGMA quick_check(%d)`, maxCheckProblems))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var problems []string
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			return nil, err
		}
		if line != "ok" {
			problems = append(problems, line)
		}
	}
	return problems, rows.Err()
}
