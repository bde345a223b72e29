// Package sqlite stores one shard of a context in one SQLite file
// (modernc.org/sqlite, no cgo).
//
// A Shard has exactly one writer goroutine. Commits from every entity actor of
// the shard queue to it; it drains whatever is pending into one transaction
// (group commit: one fsync for many requests) and then answers each commit.
// Reads use a separate pool of read-only connections, which WAL mode lets run
// beside the writer. Nothing else writes the file, so SQLITE_BUSY never
// happens and the engine needs no retries.
package sqlite
