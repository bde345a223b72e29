package kuma

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

func TestFeedEventJSONMatchesEncodingJSON(t *testing.T) {
	for _, e := range []FeedEvent{
		{Entity: "user_0x9A4F", Version: 7, Type: "UserCreated", Data: json.RawMessage(`{"name":"Dwighson","s":"caf\u00e9 \"q\""}`),
			Time: time.Date(2026, 12, 6, 12, 0, 0, 123456000, time.UTC), Position: "p1.3.1042"},
		{Entity: "a:b=c@d-e", Version: 1, Type: "x.y:z-w", Data: json.RawMessage(`[1,2.5,null,true]`),
			Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Position: "p1.0.1"},
		{Entity: "n", Version: 1 << 40, Type: "T", Data: json.RawMessage(`"just a string"`), Time: time.Unix(0, 1).UTC(), Position: "p1.15.9"},
	} {
		want, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		if got := AppendFeedEventJSON(nil, &e); !bytes.Equal(got, want) {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	}
}

func TestShardFeedPageRoundTripAndDamage(t *testing.T) {
	p := ShardFeedPage{Next: 99, Events: []ShardFeedEvent{
		{Time: 1700000000000000000, Seq: 97, JSON: []byte(`{"a":1}`)},
		{Time: 1700000000000000001, Seq: 99, JSON: []byte(`{"b":[2]}`)},
	}}
	b, _ := p.MarshalBinary()
	var q ShardFeedPage
	if err := q.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if q.Next != 99 || len(q.Events) != 2 || q.Events[1].Seq != 99 || string(q.Events[1].JSON) != `{"b":[2]}` || q.Events[0].Time != p.Events[0].Time {
		t.Fatalf("round trip: %+v", q)
	}
	for i := range b {
		var r ShardFeedPage
		if err := r.UnmarshalBinary(b[:i]); err == nil {
			t.Fatalf("a page cut at byte %d of %d decoded", i, len(b))
		}
	}
	if err := new(ShardFeedPage).UnmarshalBinary(append(b, 0)); err == nil {
		t.Fatal("trailing data decoded")
	}
}

func TestFeedCursorRoundTrip(t *testing.T) {
	c := FeedCursor{Context: "payments", After: []int64{0, 1, 1 << 40, 5}}
	got, err := DecodeFeedCursor(c.String(), "payments", 4)
	if err != nil {
		t.Fatal(err)
	}
	for i := range c.After {
		if got.After[i] != c.After[i] {
			t.Fatalf("shard %d: %d, want %d", i, got.After[i], c.After[i])
		}
	}
	if empty, err := DecodeFeedCursor("", "payments", 4); err != nil || len(empty.After) != 4 || empty.After[2] != 0 {
		t.Fatalf("empty cursor: %+v %v", empty, err)
	}
	s := c.String()
	for i := len(feedCursorPrefix); i < len(s); i++ {
		flipped := []byte(s)
		flipped[i] ^= 0x01
		if _, err := DecodeFeedCursor(string(flipped), "payments", 4); err == nil {
			t.Fatalf("a cursor changed at %d decoded", i)
		} else if ErrorCode(err) != CodeBadRequest {
			t.Fatalf("changed cursor: %v, want bad_request", err)
		}
	}
}
