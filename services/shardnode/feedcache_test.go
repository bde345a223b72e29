package shardnode

import (
	"fmt"
	"testing"
)

func entriesOf(seqs ...int64) []feedEntry {
	out := make([]feedEntry, len(seqs))
	for i, s := range seqs {
		out[i] = feedEntry{seq: s, entity: fmt.Sprintf("e%d", s%3), typ: "T", json: []byte(fmt.Sprintf(`{"s":%d}`, s))}
	}
	return out
}

func seqsOf(es []feedEntry) []int64 {
	out := make([]int64, len(es))
	for i, e := range es {
		out[i] = e.seq
	}
	return out
}

func TestFeedCacheRuns(t *testing.T) {
	c := newFeedCache(1 << 20)
	if _, _, ok := c.after(0); ok {
		t.Fatal("an empty cache answered")
	}
	g := c.generation()
	c.insert(g, 10, 15, entriesOf(11, 12, 14, 15)) // 13 was forgotten
	for _, tc := range []struct {
		after int64
		want  string
		ok    bool
	}{
		{9, "", false}, {10, "[11 12 14 15]", true}, {12, "[14 15]", true}, {13, "[14 15]", true}, {15, "", false},
	} {
		got, to, ok := c.after(tc.after)
		if ok != tc.ok || (ok && (fmt.Sprint(seqsOf(got)) != tc.want || to != 15)) {
			t.Fatalf("after %d: %v %d %v, want %s %v", tc.after, seqsOf(got), to, ok, tc.want, tc.ok)
		}
	}
	c.insert(g, 15, 18, entriesOf(16, 18)) // continues the run
	if got, to, _ := c.after(14); fmt.Sprint(seqsOf(got)) != "[15 16 18]" || to != 18 {
		t.Fatalf("extended: %v to %d", seqsOf(got), to)
	}
	c.insert(g, 5, 12, entriesOf(6, 7)) // older: dropped
	if _, _, ok := c.after(5); ok {
		t.Fatal("an older run replaced the newer one")
	}
	c.insert(g, 30, 32, entriesOf(31, 32)) // newer and disjoint: replaces
	if _, _, ok := c.after(15); ok {
		t.Fatal("the old run survived a newer disjoint one")
	}
	if got, _, ok := c.after(30); !ok || fmt.Sprint(seqsOf(got)) != "[31 32]" {
		t.Fatalf("the newer run: %v %v", seqsOf(got), ok)
	}
}

func TestFeedCacheForgetAndGeneration(t *testing.T) {
	c := newFeedCache(1 << 20)
	g := c.generation()
	c.insert(g, 0, 6, entriesOf(1, 2, 3, 4, 5, 6))
	c.forget("e1") // seqs 1 and 4
	if got, _, _ := c.after(0); fmt.Sprint(seqsOf(got)) != "[2 3 5 6]" {
		t.Fatalf("after forget: %v", seqsOf(got))
	}
	// A run read before the forget is refused: it may hold the entity.
	c.insert(g, 6, 9, entriesOf(7, 8, 9))
	if _, _, ok := c.after(6); ok {
		t.Fatal("a run read before the forget was inserted")
	}
	c.insert(c.generation(), 6, 9, entriesOf(8, 9))
	if got, _, ok := c.after(6); !ok || fmt.Sprint(seqsOf(got)) != "[8 9]" {
		t.Fatalf("a run read after the forget: %v %v", seqsOf(got), ok)
	}
}

func TestFeedCacheEvictsOldestWithinItsBound(t *testing.T) {
	c := newFeedCache(1000)
	g := c.generation()
	var seqs []int64
	for s := int64(1); s <= 100; s++ {
		seqs = append(seqs, s)
	}
	c.insert(g, 0, 100, entriesOf(seqs...))
	if c.bytes > 1000 {
		t.Fatalf("%d bytes held, bound 1000", c.bytes)
	}
	got, to, ok := c.after(c.from)
	if !ok || to != 100 || got[len(got)-1].seq != 100 || got[0].seq != c.from+1 {
		t.Fatalf("kept %v..., to %d, from %d", seqsOf(got)[:1], to, c.from)
	}
	if _, _, ok := c.after(1); ok {
		t.Fatal("an evicted position answered")
	}
}
