package main

// The outside review's probes (issue 17), re-run against a real `kuma up`
// process the way the reviewers met them: raw NATS requests with hand-made
// bytes (as the nats CLI or a C client sends them, not the Go client), replies
// checked with a parser as strict as theirs, and the data directory read as
// bytes. Each probe names the hole it once found.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

func TestOutsideReviewProbes(t *testing.T) {
	n := startReviewNode(t)
	const ctx = "default"
	subj := func(op, id string) string { return kuma.EntitySubject(ctx, op, id) }

	// 2. A $SRV reply must not publish into a stream, a bucket or an API.
	t.Run("srv-replies-stay-out-of-kuma-and-nats-namespaces", func(t *testing.T) {
		n.t = t
		targets := []string{
			kuma.EventsSubject(ctx, 15), kuma.ForgottenSubject(ctx, 3),
			"_kuma.probe.x", "$KV.probe.x", "$O.probe.x", "$JS.API.probe",
		}
		got := make(chan *nats.Msg, 64)
		for _, s := range targets {
			sub, err := n.nc.ChanSubscribe(s, got)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Unsubscribe()
		}
		for _, verb := range []string{"PING", "INFO", "STATS"} {
			for _, svc := range []string{"", ".kuma-shardnode", ".kuma-router", ".kuma-projector", ".kuma-keyvault"} {
				for _, to := range targets {
					if err := n.nc.PublishRequest("$SRV."+verb+svc, to, nil); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		// A request round trip after them, then time for any late answer.
		n.ok(subj("append", "srv-probe"), appendBody(`{"type":"T","data":{}}`), nil)
		time.Sleep(time.Second)
		if len(got) > 0 {
			m := <-got
			t.Fatalf("a $SRV handler answered into %s (%d answers): %.200s", m.Subject, len(got)+1, m.Data)
		}
		// Discovery itself still works for a normal inbox.
		if _, err := n.nc.Request("$SRV.PING.kuma-shardnode", nil, 5*time.Second); err != nil {
			t.Fatalf("nats micro ping of the shardnode: %v", err)
		}
	})

	// 4. Bad input is refused and changes nothing.
	t.Run("bad-input-refused", func(t *testing.T) {
		n.t = t
		id := "bad-input-probe"
		n.ok(subj("append", id), appendBody(`{"type":"T","data":{"ok":true}}`), nil)
		for _, tc := range []struct {
			name string
			body string
		}{
			{"invalid UTF-8 in data", "{\"events\":[{\"type\":\"T\",\"data\":{\"s\":\"\xff\xfe\"}}]}"},
			{"invalid UTF-8 in a key", "{\"events\":[{\"type\":\"T\",\"data\":{\"\xc3\x28\":1}}]}"},
			{"duplicate top-level key", `{"events":[{"type":"T","data":{}}],"events":[{"type":"U","data":{}}]}`},
			{"duplicate key in an event", `{"events":[{"type":"T","type":"U","data":{}}]}`},
			{"duplicate key in data", `{"events":[{"type":"T","data":{"a":1,"a":2}}]}`},
			{"lone surrogate", `{"events":[{"type":"T","data":{"s":"\ud800"}}]}`},
			{"number past a double", `{"events":[{"type":"T","data":{"n":1e400}}]}`},
		} {
			e := n.wantCode(subj("append", id), []byte(tc.body), kuma.CodeBadRequest, kuma.CodeInvalidEvent)
			t.Logf("%s: %s", tc.name, e.Message)
		}
		for _, at := range []string{"2263-01-01T00:00:00Z", "1677-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"} {
			n.wantCode(subj("read", id), []byte(`{"at_time":"`+at+`"}`), kuma.CodeBadRequest)
		}
		n.wantCode(subj("read", id), []byte("{\"at_version\":1,\"x\":\"\xff\"}"), kuma.CodeBadRequest)
		var r kuma.ReadReply
		n.ok(subj("read", id), nil, &r)
		if r.Version != 1 || compact(r.State) != `{"ok":true}` {
			t.Fatalf("after the refused appends the entity is at version %d with %s, want 1 and {\"ok\":true}", r.Version, r.State)
		}
	})

	// 3. Every answer arrives, however large.
	t.Run("large-answers-arrive", func(t *testing.T) {
		n.t = t
		blob := strings.Repeat("x", 60<<10)
		ev := func(i int) string { return fmt.Sprintf(`{"type":"Big","data":{"i":%d,"blob":%q}}`, i, blob) }
		id := "big-history"
		for b := 0; b < 2; b++ {
			var evs []string
			for i := range 100 {
				evs = append(evs, ev(b*100+i))
			}
			n.ok(subj("append", id), appendBody(evs...), nil)
		}
		seen := map[int64]bool{}
		from := int64(1)
		for pages := 0; ; pages++ {
			if pages > 200 {
				t.Fatal("history never ended")
			}
			var h kuma.HistoryReply
			n.ok(subj("history", id), []byte(fmt.Sprintf(`{"from_version":%d,"limit":200}`, from)), &h)
			if len(h.Events) == 0 && h.NextVersion != nil {
				t.Fatalf("an empty page that goes on at %d", *h.NextVersion)
			}
			for _, e := range h.Events {
				if seen[e.Version] {
					t.Fatalf("version %d twice", e.Version)
				}
				seen[e.Version] = true
			}
			if h.NextVersion == nil {
				break
			}
			from = *h.NextVersion
		}
		if len(seen) != 200 {
			t.Fatalf("history pages held %d events, want 200", len(seen))
		}

		// Many entities whose states fill more than one reply: the
		// unfiltered entities query pages through all of them.
		var lastPos string
		for i := range 150 {
			var a kuma.AppendReply
			n.ok(subj("append", fmt.Sprintf("wide-%03d", i)), appendBody(ev(i)), &a)
			lastPos = a.Position
		}
		rows := map[string]bool{}
		cursor := ""
		for pages := 0; ; pages++ {
			if pages > 500 {
				t.Fatal("the entities query never ended")
			}
			q := map[string]any{"limit": 1000, "after": lastPos, "wait_ms": 10000}
			if cursor != "" {
				q["cursor"] = cursor
			}
			body, _ := json.Marshal(q)
			var qr kuma.QueryReply
			n.ok(kuma.QuerySubject(ctx, "entities"), body, &qr)
			for _, row := range qr.Rows {
				id, _ := row["entity"].(string)
				if rows[id] {
					t.Fatalf("entity %s on two pages", id)
				}
				rows[id] = true
			}
			if qr.NextCursor == "" {
				break
			}
			cursor = qr.NextCursor
		}
		for i := range 150 {
			if id := fmt.Sprintf("wide-%03d", i); !rows[id] {
				t.Fatalf("the entities query never returned %s (%d rows in all)", id, len(rows))
			}
		}

		// A state that cannot fit in any reply answers payload_too_large,
		// saying what to do.
		huge := "huge-state"
		for b := 0; b < 2; b++ {
			var evs []string
			for i := range 80 {
				evs = append(evs, fmt.Sprintf(`{"type":"Big","data":{"k%d":%q}}`, b*80+i, blob))
			}
			n.ok(subj("append", huge), appendBody(evs...), nil)
		}
		for _, op := range []string{"read", "export"} {
			e := n.wantCode(subj(op, huge), nil, kuma.CodePayloadTooLarge)
			if !strings.Contains(e.Message, "history") {
				t.Fatalf("%s of a 9.6 MB state: %q does not say to page history", op, e.Message)
			}
		}
	})

	// 1 and 5. Forget, then restart: the shard serves, and nothing of the
	// forgotten entity is left on disk.
	t.Run("forget-survives-restart-and-leaves-nothing", func(t *testing.T) {
		n.t = t
		secret := "probe-secret-" + strconv.FormatInt(time.Now().UnixNano(), 36)
		// Shard 1: the victim holds the last positions. Shard 2: its only
		// entity is forgotten. Shard 3: a middle entity.
		last := idsOnShard("subject-last-", 1, 2)
		only := idsOnShard("subject-only-", 2, 1)
		middle := idsOnShard("subject-mid-", 3, 3)
		write := func(id string, k int) {
			for i := range k {
				n.ok(subj("append", id), appendBody(fmt.Sprintf(`{"type":"Noted","data":{"note":%q,"i":%d}}`, secret+"-"+id, i)), nil)
			}
		}
		write(last[0], 2)
		write(last[1], 2) // the victim: the shard's last positions
		write(only[0], 2)
		for _, id := range middle {
			write(id, 2)
		}
		victims := []string{last[1], only[0], middle[1]}
		for _, id := range victims {
			var f kuma.ForgetReply
			n.ok(subj("forget", id), []byte(`{"reason":"probe"}`), &f)
			if f.EventsDeleted != 2 {
				t.Fatalf("forget %s deleted %d events, want 2", id, f.EventsDeleted)
			}
		}
		n.stop()
		n.start()
		for _, id := range victims {
			n.wantCode(subj("read", id), nil, kuma.CodeEntityForgotten)
			n.wantCode(subj("append", id), appendBody(`{"type":"T","data":{}}`), kuma.CodeEntityForgotten)
		}
		for _, id := range []string{last[0], middle[0], middle[2]} {
			var r kuma.ReadReply
			n.ok(subj("read", id), nil, &r)
			if r.Version != 2 {
				t.Fatalf("%s after the restart at version %d, want 2", id, r.Version)
			}
		}
		for shard := 1; shard <= 3; shard++ {
			for _, id := range idsOnShard(fmt.Sprintf("after-restart-%d-", shard), shard, 2) {
				var a kuma.AppendReply
				n.ok(subj("append", id), appendBody(`{"type":"T","data":{}}`), &a)
				if a.FirstVersion != 1 {
					t.Fatalf("a new entity on shard %d starts at version %d", shard, a.FirstVersion)
				}
			}
		}

		// Nothing of the victims on disk or in the logs, once the forget's
		// work is done (checkpoints, snapshot replacement: poll a while).
		var needles [][]byte
		for _, id := range victims {
			needles = append(needles, []byte(id), []byte(secret+"-"+id))
		}
		// A survivor's id and data are on disk in clear (its shard rows,
		// and the entities read model once the projector has applied it):
		// the grep can see what it looks for.
		survivor := [][]byte{[]byte(last[0]), []byte(secret + "-" + last[0])}
		var found []string
		for deadline := time.Now().Add(90 * time.Second); ; {
			found = grepTree(t, n.dir, needles)
			seen := len(grepTree(t, n.dir, survivor[:1])) > 0 && len(grepTree(t, n.dir, survivor[1:])) > 0
			if (len(found) == 0 && seen) || time.Now().After(deadline) {
				if !seen {
					t.Fatalf("a survivor's id or data is nowhere on disk: the grep cannot see")
				}
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		if len(found) > 0 {
			t.Fatalf("after forget, the data dir still holds a victim's id or data:\n%s", strings.Join(found, "\n"))
		}
		for _, nd := range needles {
			if bytes.Contains([]byte(n.p.logs.String()), nd) {
				t.Fatalf("the logs name %q after its forget", nd)
			}
		}
	})

	// 6. Files with data in them are the owner's only.
	t.Run("data-files-are-private", func(t *testing.T) {
		n.t = t
		var loose []string
		err := filepath.WalkDir(n.dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			info, err := d.Info()
			if err != nil {
				return nil // a file removed meanwhile
			}
			base := filepath.Base(path)
			dataFile := strings.HasSuffix(base, ".db") || strings.Contains(base, ".db-")
			if path == n.dir && info.Mode().Perm()&0o077 != 0 {
				loose = append(loose, fmt.Sprintf("%s %v", path, info.Mode().Perm()))
			}
			if dataFile && info.Mode().Perm()&0o077 != 0 {
				loose = append(loose, fmt.Sprintf("%s %v", path, info.Mode().Perm()))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(loose) > 0 {
			t.Fatalf("readable by others:\n%s", strings.Join(loose, "\n"))
		}
	})
}

// grepTree lists "file: needle" for every needle found in a file under dir.
func grepTree(t *testing.T, dir string, needles [][]byte) []string {
	t.Helper()
	var found []string
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil // removed meanwhile
		}
		for _, nd := range needles {
			if bytes.Contains(b, nd) {
				rel, _ := filepath.Rel(dir, path)
				found = append(found, rel+": "+string(nd))
			}
		}
		return nil
	})
	return found
}
