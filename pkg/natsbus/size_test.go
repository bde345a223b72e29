package natsbus_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
)

// TestPageCutsBySize holds that a page takes items in order while the
// array fits in its budget, and that its bytes are json.Marshal's.
func TestPageCutsBySize(t *testing.T) {
	item := map[string]string{"s": strings.Repeat("x", 10)} // {"s":"xxxxxxxxxx"}: 18 bytes
	for _, tc := range []struct {
		name          string
		limit, around int
		want          int
	}{
		{"all fit", 1000, 0, 5},
		{"exactly two", 2 + 18 + 1 + 18 + 10, 10, 2}, // [a,b] plus around
		{"one byte short of two", 2 + 18 + 1 + 18 + 10 - 1, 10, 1},
		{"none", 2 + 17, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := natsbus.NewPage(tc.limit, tc.around)
			var taken []any
			for i := 0; i < 5; i++ {
				fits, size, err := p.Add(item)
				if err != nil {
					t.Fatal(err)
				}
				if size != 18 {
					t.Fatalf("item size = %d, want 18", size)
				}
				if !fits {
					break
				}
				taken = append(taken, item)
			}
			if p.Len() != tc.want {
				t.Fatalf("page took %d items, want %d", p.Len(), tc.want)
			}
			want, _ := json.Marshal(append([]any{}, taken...))
			got := p.AppendTo(nil)
			if string(got) != string(want) || p.Size() != len(got) {
				t.Fatalf("page = %s (size %d), want %s", got, p.Size(), want)
			}
			if len(got)+tc.around > tc.limit {
				t.Fatalf("page of %d bytes plus %d around is over the limit %d", len(got), tc.around, tc.limit)
			}
		})
	}
}

// TestEncodeReply holds the one size check of every answer: it says
// whether the body fits, and a json.RawMessage goes as it is.
func TestEncodeReply(t *testing.T) {
	for _, tc := range []struct {
		v    any
		want string
		fits bool
	}{
		{map[string]int{"a": 1}, `{"a":1}`, true}, // 7 bytes: at the limit
		{map[string]int{"a": 10}, `{"a":10}`, false},
		{json.RawMessage(`{"x": <not re-encoded>}`), `{"x": <not re-encoded>}`, false},
		{json.RawMessage(`1`), `1`, true},
	} {
		b, fits, err := natsbus.EncodeReply(tc.v, 7)
		if err != nil || string(b) != tc.want || fits != tc.fits {
			t.Errorf("EncodeReply(%v, 7) = %s, %v, %v; want %s, %v", tc.v, b, fits, err, tc.want, tc.fits)
		}
	}
	e := natsbus.TooLarge(8, 7, "the thing", "ask for less")
	if e.Code != kuma.CodePayloadTooLarge || e.Details["size"] != 8 || e.Details["limit"] != 7 ||
		!strings.Contains(e.Message, "the thing is 8 bytes") || !strings.Contains(e.Message, "ask for less") {
		t.Fatalf("TooLarge = %+v, want payload_too_large naming it, its size, the limit and the hint", e)
	}
}
