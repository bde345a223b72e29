package shardnode

import (
	"testing"
	"time"
)

// TestFailedTakesBackOff: a shard whose takes keep failing is taken again
// after a wait that doubles with each failure in a row, up to 5 s, and a
// take that succeeds ends the wait; other shards are not held back.
func TestFailedTakesBackOff(t *testing.T) {
	o := &owner{}
	a, b := shardKey{"default", 0}, shardKey{"default", 1}
	now := time.Minute
	if !o.mayTake(a, now) {
		t.Fatal("a shard that never failed must be taken at once")
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond,
		1600 * time.Millisecond, 3200 * time.Millisecond, 5 * time.Second, 5 * time.Second}
	for i, w := range want {
		o.tookShard(a, false, now)
		if o.mayTake(a, now+w-time.Millisecond) {
			t.Fatalf("after %d failures the shard was taken again before %v", i+1, w)
		}
		if !o.mayTake(a, now+w) {
			t.Fatalf("after %d failures the shard was not taken again at %v", i+1, w)
		}
		if !o.mayTake(b, now) {
			t.Fatal("another shard was held back by this one's failures")
		}
		now += w
	}
	o.tookShard(a, true, now)
	o.tookShard(a, false, now)
	if o.mayTake(a, now+99*time.Millisecond) || !o.mayTake(a, now+100*time.Millisecond) {
		t.Fatal("a success did not start the waits over")
	}
}
