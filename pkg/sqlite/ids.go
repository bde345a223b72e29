package sqlite

import (
	"context"
	"fmt"
)

// EntityIDs returns the ids of every entity the shard holds, in id order. A
// shard rebuilt from the event stream uses it to find the entities that the
// stream's forget notices name by pseudonym; it reads the whole table, so it
// is for that rare path only.
func (s *Shard) EntityIDs(ctx context.Context) ([]string, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT entity FROM entities ORDER BY entity`)
	if err != nil {
		return nil, fmt.Errorf("sqlite: list entities: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var e string
		if err := rows.Scan(&e); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}
