package main

import (
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

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
