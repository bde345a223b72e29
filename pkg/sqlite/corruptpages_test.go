package sqlite

import (
	"database/sql"
	"encoding/binary"
	"os"
	"testing"
)

// corruptPage is one b-tree page of a closed file, as dbstat lists it.
type corruptPage struct {
	No   int64
	Type string // internal, leaf, overflow
}

// corruptLayout returns the page size and the pages of table name (in
// b-tree order) of a closed file.
func corruptLayout(t testing.TB, path, name string) (pageSize int64, pages []corruptPage) {
	t.Helper()
	db, err := sql.Open("sqlite", DSN(path, "query_only(1)"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.QueryRow(`PRAGMA page_size`).Scan(&pageSize); err != nil {
		t.Fatal(err)
	}
	rows, err := db.Query(`SELECT pageno, pagetype FROM dbstat WHERE name = ? ORDER BY path`, name)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var p corruptPage
		if err := rows.Scan(&p.No, &p.Type); err != nil {
			t.Fatal(err)
		}
		pages = append(pages, p)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return pageSize, pages
}

// corruptMiddleLeaf returns the middle leaf page of the events table: not
// on the path that SELECT MAX(pos) at open walks, so the damage there is
// found by a read of its rows or by Check, not by Open.
func corruptMiddleLeaf(t testing.TB, path string) (pageSize int64, page corruptPage) {
	t.Helper()
	pageSize, pages := corruptLayout(t, path, "events")
	var leaves []corruptPage
	for _, p := range pages {
		if p.Type == "leaf" {
			leaves = append(leaves, p)
		}
	}
	if len(leaves) < 10 {
		t.Fatalf("the events table has %d leaf pages; the test needs more", len(leaves))
	}
	return pageSize, leaves[len(leaves)/2]
}

// corruptFirstRowid returns the rowid (position) of the first cell of a
// table leaf page: b-tree page header, first cell pointer, then the cell's
// payload-size varint and rowid varint.
func corruptFirstRowid(t testing.TB, path string, pageSize int64, page corruptPage) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pg := b[(page.No-1)*pageSize : page.No*pageSize]
	if pg[0] != 0x0d {
		t.Fatalf("page %d is of type %#x, not a table leaf", page.No, pg[0])
	}
	cell := pg[binary.BigEndian.Uint16(pg[8:10]):]
	_, n := sqliteVarint(cell)
	rowid, _ := sqliteVarint(cell[n:])
	return int64(rowid)
}

// sqliteVarint decodes SQLite's big-endian varint (1 to 9 bytes).
func sqliteVarint(b []byte) (uint64, int) {
	var v uint64
	for i := 0; i < 8; i++ {
		v = v<<7 | uint64(b[i]&0x7f)
		if b[i]&0x80 == 0 {
			return v, i + 1
		}
	}
	return v<<8 | uint64(b[8]), 9
}
