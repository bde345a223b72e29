package main

// The outside review's probes (issue 17), re-run against a real `kuma up`
// process the way the reviewers met them: raw NATS requests with hand-made
// bytes (as the nats CLI or a C client sends them, not the Go client), replies
// checked with a parser as strict as theirs, and the data directory read as
// bytes. Each probe names the hole it once found.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go"
)

const reviewShards = 4

// reviewNode is one `kuma up` process for the probes, restartable on its
// data dir.
type reviewNode struct {
	t    *testing.T
	dir  string
	port int
	p    *proc
	nc   *nats.Conn
}

func startReviewNode(t *testing.T) *reviewNode {
	n := &reviewNode{t: t, dir: filepath.Join(t.TempDir(), "data"), port: freePort(t)}
	n.start()
	return n
}

func (n *reviewNode) args() []string {
	return []string{"up", "--data", n.dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(n.port),
		"--shards", strconv.Itoa(reviewShards), "--metrics-listen", "127.0.0.1:0", "--console-listen", "", "--log-format", "text"}
}

func (n *reviewNode) start() {
	n.t.Helper()
	n.p = spawn(n.t, n.args())
	n.p.waitReady(n.t, 90*time.Second)
	nc, err := nats.Connect("nats://127.0.0.1:"+strconv.Itoa(n.port), nats.MaxReconnects(-1))
	if err != nil {
		n.t.Fatal(err)
	}
	n.nc = nc
	n.t.Cleanup(nc.Close)
}

// stop sends SIGTERM and requires a clean exit.
func (n *reviewNode) stop() {
	n.t.Helper()
	n.nc.Close()
	if err := n.p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		n.t.Fatal(err)
	}
	if err := n.p.cmd.Wait(); err != nil {
		n.t.Fatalf("kuma up after SIGTERM: %v\n%s", err, tail(n.p.logs.String(), 40))
	}
	<-n.p.logs.closed
}

// reply is one answer as a foreign client sees it.
type reply struct {
	body []byte
	code kuma.Code // "" for a success
	err  *kuma.Error
}

// req sends body on subject as raw bytes and returns the answer, failing the
// test when none arrives or when the answer is not strict JSON: a reply that
// a strict parser in another language rejects is as lost as no reply.
func (n *reviewNode) req(subject string, body []byte) reply {
	n.t.Helper()
	msg, err := n.nc.Request(subject, body, 15*time.Second)
	if err != nil {
		n.t.Fatalf("%s: no answer: %v", subject, err)
	}
	if err := strictJSON(msg.Data); err != nil {
		n.t.Fatalf("%s: the answer is not strict JSON (%v): %.200q", subject, err, msg.Data)
	}
	r := reply{body: msg.Data}
	if h := msg.Header.Get("Nats-Service-Error-Code"); h != "" {
		var er kuma.ErrorReply
		if err := json.Unmarshal(msg.Data, &er); err != nil || er.Error == nil {
			n.t.Fatalf("%s: error header %s but body %.200q", subject, h, msg.Data)
		}
		if h != strconv.Itoa(er.Error.Code.Status()) {
			n.t.Fatalf("%s: header %s does not match code %s", subject, h, er.Error.Code)
		}
		r.code, r.err = er.Error.Code, er.Error
	}
	return r
}

func (n *reviewNode) ok(subject string, body []byte, out any) {
	n.t.Helper()
	r := n.req(subject, body)
	if r.code != "" {
		n.t.Fatalf("%s %.120s: %s %s", subject, body, r.code, r.err.Message)
	}
	if out != nil {
		if err := json.Unmarshal(r.body, out); err != nil {
			n.t.Fatal(err)
		}
	}
}

func (n *reviewNode) wantCode(subject string, body []byte, codes ...kuma.Code) *kuma.Error {
	n.t.Helper()
	r := n.req(subject, body)
	for _, c := range codes {
		if r.code == c {
			return r.err
		}
	}
	n.t.Fatalf("%s %.120q: answered %s %.200s, want one of %v", subject, body, r.code, r.body, codes)
	return nil
}

func appendBody(events ...string) []byte {
	return []byte(`{"events":[` + strings.Join(events, ",") + `]}`)
}

// strictJSON is what a strict parser (the reviewers used one from C) checks:
// valid UTF-8, no lone surrogate escapes, no duplicate keys, numbers a double
// can hold.
func strictJSON(b []byte) error {
	if !utf8.Valid(b) {
		return errors.New("invalid UTF-8")
	}
	if hasLoneSurrogate(b) {
		return errors.New("a lone surrogate escape")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := strictValue(dec); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("data after the value")
	}
	return nil
}

// hasLoneSurrogate reports a \uD800-\uDFFF escape that is not a high
// surrogate followed by a low one: a strict parser rejects it, Go turns it
// into U+FFFD.
func hasLoneSurrogate(b []byte) bool {
	hex4 := func(i int) (int, bool) {
		if i+6 > len(b) || b[i] != '\\' || b[i+1] != 'u' {
			return 0, false
		}
		v, err := strconv.ParseUint(string(b[i+2:i+6]), 16, 16)
		return int(v), err == nil
	}
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		if i+1 < len(b) && b[i+1] != 'u' {
			i++ // an escape of one character, \\ included
			continue
		}
		v, ok := hex4(i)
		if !ok {
			continue
		}
		switch {
		case v >= 0xD800 && v < 0xDC00:
			if w, ok := hex4(i + 6); !ok || w < 0xDC00 || w > 0xDFFF {
				return true
			}
			i += 11
		case v >= 0xDC00 && v <= 0xDFFF:
			return true
		default:
			i += 5
		}
	}
	return false
}

func strictValue(dec *json.Decoder) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	switch v := tok.(type) {
	case json.Delim:
		switch v {
		case '{':
			seen := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				key := k.(string)
				if seen[key] {
					return fmt.Errorf("duplicate key %q", key)
				}
				seen[key] = true
				if err := strictValue(dec); err != nil {
					return err
				}
			}
		case '[':
			for dec.More() {
				if err := strictValue(dec); err != nil {
					return err
				}
			}
		}
		_, err := dec.Token() // the closing delimiter
		return err
	case json.Number:
		if _, err := v.Float64(); err != nil {
			return fmt.Errorf("number %s: %v", v, err)
		}
	}
	return nil
}

// idsOnShard returns n entity ids with prefix that live on shard.
func idsOnShard(prefix string, shard, n int) []string {
	var out []string
	for i := 0; len(out) < n; i++ {
		id := prefix + strconv.Itoa(i)
		if placement.ShardOf(id, reviewShards) == shard {
			out = append(out, id)
		}
	}
	return out
}

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
