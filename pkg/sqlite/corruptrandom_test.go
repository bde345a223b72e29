package sqlite

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/kumadb/kuma/internal/damage"
)

// TestCorruptRandomBits flips one random bit of one random page per round
// (seeded, so every run flips the same bits; every other round within the
// page's first 64 bytes) and sorts out what the shard
// makes of it: refused at open, found by Check or by a read (the shard is
// then marked corrupt), harmless (everything reads back the same), a
// changed payload (which the entity's AES-GCM tag refuses above this
// package), or a silent change of another field. A changed version or
// entity id is never silent: it must be found here or break the payload's
// AAD above. Times are not sealed: a changed time is silent, and the test
// reports how often that happened.
func TestCorruptRandomBits(t *testing.T) {
	ctx := context.Background()
	pristine := filepath.Join(t.TempDir(), "shard-000.db")
	corruptBuild(t, pristine)
	s, _, err := corruptOpen(t, corruptCopy(t, pristine))
	if err != nil {
		t.Fatal(err)
	}
	want, err := corruptRead(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(pristine)
	if err != nil {
		t.Fatal(err)
	}
	pageSize, _ := corruptLayout(t, pristine, "events")
	pages := st.Size() / pageSize
	outcomes := map[string]int{}
	const rounds = 24
	for round := 0; round <= rounds; round++ {
		path := corruptCopy(t, pristine)
		rng := mrand.New(mrand.NewPCG(7, uint64(round)))
		page := 2 + rng.Int64N(pages-1) // page 1 is the file header and schema
		// Most of a page is payload bytes; every other round aims at the
		// first 64 bytes, where page headers and cell pointers are.
		within := rng.Int64N(pageSize)
		if round%2 == 0 {
			within = rng.Int64N(64)
		}
		off := (page-1)*pageSize + within
		if round > 0 { // round 0 is the control: no flip
			damage.Flip(t, path, off, 1<<rng.IntN(8))
		}
		outcome, detail := corruptClassify(ctx, t, path, want)
		if round == 0 && outcome != "harmless" {
			t.Fatalf("the unflipped control classified as %s (%s)", outcome, detail)
		}
		if outcome == "silent" {
			t.Errorf("round %d, page %d, byte %d: %s", round, page, off%pageSize, detail)
		}
		if round > 0 {
			outcomes[outcome]++
		}
		t.Logf("round %d: page %d byte %d: %s %s", round, page, off%pageSize, outcome, detail)
	}
	t.Logf("%d random bit flips in a %d-page shard: %v", rounds, pages, outcomes)
}

// corruptClassify opens path and compares what it reads with want.
func corruptClassify(ctx context.Context, t *testing.T, path string, want corruptContent) (outcome, detail string) {
	s, calls, err := corruptOpen(t, path)
	switch {
	case IsCorrupt(err):
		return "detected", "at open: " + err.Error()
	case err != nil:
		// A damaged meta row reads as another shard's file: refused too.
		return "refused", err.Error()
	}
	if err := s.Check(ctx); err != nil {
		if !errors.Is(err, ErrCorrupt) || calls.Load() != 1 {
			t.Fatalf("Check: %v (OnCorrupt %d calls); want ErrCorrupt, once", err, calls.Load())
		}
		return "detected", "by Check"
	}
	got, err := corruptRead(ctx, s)
	if err != nil {
		if !IsCorrupt(err) || calls.Load() != 1 {
			t.Fatalf("read: %v (OnCorrupt %d calls); every read error of a damaged file must be a corruption", err, calls.Load())
		}
		return "detected", "by a read: " + err.Error()
	}
	if reflect.DeepEqual(got, want) {
		return "harmless", ""
	}
	var payloads, times int
	var other []string
	for id, w := range want.Entities {
		g, ok := got.Entities[id]
		switch {
		case !ok:
			other = append(other, id+": entity row gone")
		case g.Version != w.Version:
			other = append(other, fmt.Sprintf("%s: entity version %d, was %d", id, g.Version, w.Version))
		case g != w:
			times++
		}
	}
	for id, w := range want.Events {
		g := got.Events[id]
		if len(g) != len(w) {
			other = append(other, fmt.Sprintf("%s: %d events, was %d", id, len(g), len(w)))
			continue
		}
		for i := range w {
			switch {
			case g[i].Seq != w[i].Seq || g[i].Version != w[i].Version:
				other = append(other, fmt.Sprintf("%s: event %d at %d/v%d, was %d/v%d", id, i, g[i].Seq, g[i].Version, w[i].Seq, w[i].Version))
			case !bytes.Equal(g[i].Payload, w[i].Payload):
				payloads++
			case !g[i].Time.Equal(w[i].Time):
				times++
			}
		}
	}
	switch {
	case len(other) > 0:
		return "silent", fmt.Sprint(other)
	case payloads > 0:
		return "payload", fmt.Sprintf("%d payloads changed (AES-GCM refuses them above)", payloads)
	default:
		return "time", fmt.Sprintf("%d times changed (not sealed: a known limit)", times)
	}
}
