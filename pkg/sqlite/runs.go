package sqlite

import (
	"encoding/binary"
	"fmt"
)

// A row of events holds a run: n events of one entity with consecutive
// positions (pos-n+1 .. pos) and versions (version-n+1 .. version), all
// committed at the same time. An append is one run, so that SQLite writes
// one row and one index entry per append rather than per event: raw SQLite
// on this machine does three times the events when the 100 events of an
// append are one row (BENCHMARKS.md), and the writer was 29 % of the node's
// CPU. Every event keeps its own seal (its associated data names its
// version), so a run is framed, not sealed again.
//
// The payload of a run of one is the event's sealed payload itself, as in
// files from before runs (schema 1, where every row is such a run); a
// longer run's payload is each sealed payload preceded by its length as a
// uvarint.

// FrameRun packs the sealed payloads of a run into one row's payload. It
// and SplitRun are the file format, for tools and tests that read or
// write shard files directly.
func FrameRun(payloads [][]byte) []byte {
	if len(payloads) == 1 {
		return payloads[0]
	}
	size := 0
	for _, p := range payloads {
		size += binary.MaxVarintLen32 + len(p)
	}
	b := make([]byte, 0, size)
	for _, p := range payloads {
		b = binary.AppendUvarint(b, uint64(len(p)))
		b = append(b, p...)
	}
	return b
}

// errBadRun is a row whose payload does not hold the n events its row says:
// the file is damaged (the writer never writes one).
var errBadRun = fmt.Errorf("%w: a row of events does not hold the events it counts", ErrCorrupt)

// SplitRun splits a row's payload into its n sealed payloads (sharing b's
// memory); a payload that does not hold n is ErrCorrupt.
func SplitRun(b []byte, n int64) ([][]byte, error) {
	if n == 1 {
		return [][]byte{b}, nil
	}
	if n < 1 {
		return nil, fmt.Errorf("%w: a run of %d", errBadRun, n)
	}
	out := make([][]byte, 0, n)
	for len(b) > 0 {
		l, w := binary.Uvarint(b)
		if w <= 0 || l > uint64(len(b)-w) {
			return nil, errBadRun
		}
		b = b[w:]
		out = append(out, b[:l:l])
		b = b[l:]
	}
	if int64(len(out)) != n {
		return nil, fmt.Errorf("%w: %d payloads in a run of %d", errBadRun, len(out), n)
	}
	return out, nil
}

// run is a row of events as read back.
type run struct {
	pos, version, n int64 // of the run's last event; n events
	entity          string
	payload         []byte
	time            int64
}

// first is the position of the run's first event, and firstVersion its
// version.
func (r run) first() int64        { return r.pos - r.n + 1 }
func (r run) firstVersion() int64 { return r.version - r.n + 1 }

// events calls fn with the position, version and sealed payload of each of
// the run's events, in order, until fn returns false.
func (r run) events(fn func(pos, version int64, payload []byte) bool) error {
	ps, err := SplitRun(r.payload, r.n)
	if err != nil {
		return err
	}
	for i, p := range ps {
		if !fn(r.first()+int64(i), r.firstVersion()+int64(i), p) {
			break
		}
	}
	return nil
}
