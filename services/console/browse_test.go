package console_test

import (
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/services/console"
)

// seedUsers appends user_000 ... user_(n-1), every third an architect, and
// user_0x9A4F, which sorts after user_099: past the first pages.
func seedUsers(t *testing.T, n *kumatest.Node, count int) []string {
	t.Helper()
	c := n.Client(client.Options{})
	ids := []string{"user_0x9A4F"}
	for i := range count {
		ids = append(ids, fmt.Sprintf("user_%03d", i))
	}
	ids = append(ids, "order_1", "order_2")
	for i, id := range ids {
		role := "intern"
		if i%3 == 0 {
			role = "architect"
		}
		if _, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"role":"` + role + `"}`)}}); err != nil {
			t.Fatal(err)
		}
	}
	return ids
}

// list calls GET /api/entities.
func list(t *testing.T, base string, q url.Values) (console.EntityList, response) {
	t.Helper()
	r := do(t, "GET", base+"/api/entities?"+q.Encode(), "", nil)
	var l console.EntityList
	if r.status == 200 {
		r.decode(t, &l)
	}
	return l, r
}

// TestEntityBrowserAPI: the entity browser finds an entity by prefix by
// paging, with the count of matches on the first page, and filters on a
// state field.
func TestEntityBrowserAPI(t *testing.T) {
	n := kumatest.Start(t, nil)
	ids := seedUsers(t, n, 120)
	con := startConsole(t, n, false, time.Second)
	base := "http://" + con.Addr()
	users := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return id[:5] != "user_" })
	slices.Sort(users)

	// The projection applies the shards' events a moment apart.
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, r := list(t, base, url.Values{"prefix": {"user_"}, "limit": {"50"}})
		if r.status != 200 {
			t.Fatalf("list: %d %s", r.status, r.body)
		}
		if l.Count != nil && *l.Count == len(users) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("count %v, want %d", l.Count, len(users))
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Page through the prefix: every user once, in id order; the count on
	// the first page only; user_0x9A4F is not on the first page.
	var seen []string
	cursor, page, foundOn := "", 0, 0
	for {
		q := url.Values{"prefix": {"user_"}, "limit": {"50"}}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		l, r := list(t, base, q)
		if r.status != 200 {
			t.Fatalf("page %d: %d %s", page, r.status, r.body)
		}
		page++
		if (page == 1) != (l.Count != nil) {
			t.Errorf("page %d: count %v; want it on the first page only", page, l.Count)
		}
		for _, row := range l.Rows {
			seen = append(seen, row["entity"].(string))
			if row["entity"] == "user_0x9A4F" {
				foundOn = page
			}
		}
		if cursor = l.NextCursor; cursor == "" {
			break
		}
	}
	if !slices.Equal(seen, users) {
		t.Fatalf("paging saw %d users (%v...), want the %d in id order", len(seen), seen[:min(5, len(seen))], len(users))
	}
	if foundOn < 2 || page != 3 {
		t.Errorf("user_0x9A4F found on page %d of %d, want past the first of 3", foundOn, page)
	}

	// A filter on a state field, with the prefix and without.
	architects := 0
	for i, id := range ids {
		if i%3 == 0 && id[:5] == "user_" {
			architects++
		}
	}
	l, _ := list(t, base, url.Values{"prefix": {"user_"}, "where": {"role=architect"}, "limit": {"10"}})
	if l.Count == nil || *l.Count != architects || len(l.Rows) != 10 || l.CountCapped {
		t.Errorf("where role=architect: count %v (capped %v), %d rows; want %d, 10 rows", l.Count, l.CountCapped, len(l.Rows), architects)
	}
	for _, row := range l.Rows {
		if st := row["state"].(map[string]any); st["role"] != "architect" {
			t.Errorf("where role=architect returned %v", row)
		}
	}
	if l, _ := list(t, base, url.Values{"where": {"role=nobody"}}); l.Count == nil || *l.Count != 0 || len(l.Rows) != 0 {
		t.Errorf("where role=nobody: count %v, %d rows; want 0", l.Count, len(l.Rows))
	}

	// Mistakes are bad_request and list nothing.
	for _, q := range []url.Values{
		{"where": {"role"}},
		{"where": {"=x"}},
		{"where": {`role={"a":1}`}},
		{"limit": {"0"}},
		{"limit": {"100000"}},
	} {
		if _, r := list(t, base, q); r.status != 400 || r.errorCode(t) != kuma.CodeBadRequest {
			t.Errorf("%v: %d %s, want 400 bad_request", q, r.status, r.body)
		}
	}

	// Past MaxCount the count stops and says so.
	capped, err := console.New(console.Config{Context: "default", Listen: "127.0.0.1:0", MaxCount: 50}, n.NC)
	if err != nil {
		t.Fatal(err)
	}
	if err := capped.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer capped.Stop(t.Context())
	if l, _ := list(t, "http://"+capped.Addr(), url.Values{"prefix": {"user_"}, "limit": {"20"}}); l.Count == nil || !l.CountCapped || *l.Count < 50 || *l.Count >= len(users) {
		t.Errorf("MaxCount 50: count %v capped %v, want at least 50 and capped", l.Count, l.CountCapped)
	}
}
