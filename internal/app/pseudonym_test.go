package app_test

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// rawStream returns every message of the context's stream as stored:
// subject, headers and body, one string each, read by sequence.
func rawStream(t *testing.T, nc *nats.Conn) []string {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(t.Context(), kuma.StreamName("default"))
	if err != nil {
		t.Fatal(err)
	}
	info, err := stream.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := stream.GetMsg(t.Context(), seq)
		if err != nil {
			t.Fatalf("message %d: %v", seq, err)
		}
		var b strings.Builder
		b.WriteString(m.Subject + "\n")
		for k, vs := range m.Header {
			b.WriteString(k + ": " + strings.Join(vs, ",") + "\n")
		}
		b.Write(m.Data)
		out = append(out, b.String())
	}
	return out
}

func messagesContaining(msgs []string, s string) int {
	n := 0
	for _, m := range msgs {
		if strings.Contains(m, s) {
			n++
		}
	}
	return n
}

// entityRows returns the rows of the entities read model whose id starts
// with prefix, once it has applied position after.
func entityRows(t *testing.T, c *client.Client, prefix, after string) []map[string]any {
	t.Helper()
	r, err := c.Query(t.Context(), "entities", &kuma.QueryRequest{After: after,
		Params: map[string]json.RawMessage{"prefix": json.RawMessage(`"` + prefix + `"`)}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Rows
}

// TestStreamNamesNoEntityID: the event stream names entities by pseudonym
// only, so neither a stream message (subject, headers, body) nor any file of
// the JetStream store holds the id, before a forget and after it; the
// forget notice names the pseudonym too.
func TestStreamNamesNoEntityID(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ids := sameShard("person-QX7", 2, n.Cfg.Shards)
	gone, kept := ids[0], ids[1]
	for i := 0; i < 3; i++ {
		for _, id := range ids {
			if _, err := c.Append(t.Context(), id, markerEvents(2)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// kumatest resolves the pseudonyms back to the ids: what consumers see.
	streamed := kumatest.StreamEvents(t, n.NC, "default", 12)
	if len(streamed[gone]) != 6 || len(streamed[kept]) != 6 {
		t.Fatalf("resolved stream: %d and %d events, want 6 of each", len(streamed[gone]), len(streamed[kept]))
	}
	ps, err := vaultclient.New(n.NC, 0).Pseudonyms(t.Context(), "default", ids)
	if err != nil {
		t.Fatal(err)
	}
	natsDir := filepath.Join(n.Cfg.DataDir, "nats")
	msgs := rawStream(t, n.NC)
	for _, id := range ids {
		if k := messagesContaining(msgs, id); k > 0 {
			t.Fatalf("before forget, %d stream messages hold %s in the clear", k, id)
		}
		if hits := filesContaining(t, natsDir, id); len(hits) > 0 {
			t.Fatalf("before forget, the JetStream store holds %s in %v", id, hits)
		}
	}
	// The checks can fail: the store's files hold the messages as written
	// (the pseudonyms are found in them).
	if hits := filesContaining(t, natsDir, ps[0]); len(hits) == 0 {
		t.Fatal("the pseudonym is in no file of the JetStream store: a grep of it proves nothing")
	}

	if _, err := c.Forget(t.Context(), gone, "test", ""); err != nil {
		t.Fatal(err)
	}
	msgs = rawStream(t, n.NC)
	notices := 0
	for _, m := range msgs {
		if strings.HasPrefix(m, kuma.ForgottenSubject("default", placement.ShardOf(gone, n.Cfg.Shards))+"\n") {
			notices++
			if !strings.Contains(m, `"pseudonym":"`+ps[0]+`"`) || !strings.Contains(m, "forgotten."+ps[0]) {
				t.Fatalf("the forget notice does not name the pseudonym in body and message id:\n%s", m)
			}
		}
	}
	if notices != 1 {
		t.Fatalf("%d forget notices in the stream, want 1", notices)
	}
	if k := messagesContaining(msgs, gone); k > 0 {
		t.Fatalf("after forget, %d stream messages hold the id", k)
	}
	// The forgotten entity's events stay, as noise under a pseudonym that
	// nothing resolves any more.
	if _, err := vaultclient.New(n.NC, 0).KeyByPseudonym(t.Context(), "default", ps[0]); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
		t.Fatalf("the forgotten pseudonym resolves: %v, want entity_forgotten", err)
	}
	n.Stop()
	if hits := filesContaining(t, natsDir, gone); len(hits) > 0 {
		t.Fatalf("after forget, the JetStream store holds the id in %v", hits)
	}
}

// ignoredNotices reads the projector's count of unconfirmed forget notices.
func ignoredNotices(t *testing.T, n *kumatest.Node) float64 {
	t.Helper()
	mfs, err := n.App.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "kuma_projector_forget_notices_ignored_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("no kuma_projector_forget_notices_ignored_total metric")
	return 0
}

// TestForgedForgetNoticeDropsNothing: a forget notice published straight
// into the stream for a live entity (by its pseudonym, by its id in the old
// form, or with a malformed pseudonym) drops nothing from the read model and
// is counted; a real forget still drops the entity.
func TestForgedForgetNoticeDropsNothing(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ids := sameShard("victim", 2, n.Cfg.Shards)
	victim, other := ids[0], ids[1]
	shard := placement.ShardOf(victim, n.Cfg.Shards)
	r, err := c.Append(t.Context(), victim, markerEvents(2))
	if err != nil {
		t.Fatal(err)
	}
	if rows := entityRows(t, c, victim, r.Position); len(rows) != 1 {
		t.Fatalf("the read model holds %d rows of the victim, want 1", len(rows))
	}
	ps, err := vaultclient.New(n.NC, 0).Pseudonyms(t.Context(), "default", []string{victim})
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 25, 14, 3, 7, 0, time.UTC)
	forged := []kuma.ForgottenNotice{
		{Context: "default", Shard: shard, Pseudonym: ps[0], At: at},
		{Context: "default", Shard: shard, Entity: victim, At: at},
		{Context: "default", Shard: shard, Pseudonym: "not-a-pseudonym", At: at},
	}
	for _, f := range forged {
		b, _ := json.Marshal(f)
		if _, err := js.Publish(t.Context(), kuma.ForgottenSubject("default", shard), b); err != nil {
			t.Fatal(err)
		}
	}
	// An event after the notices, on the same shard: once the read model has
	// applied it, it has been through the notices.
	r, err = c.Append(t.Context(), other, markerEvents(1))
	if err != nil {
		t.Fatal(err)
	}
	if rows := entityRows(t, c, other, r.Position); len(rows) != 1 {
		t.Fatalf("the read model holds %d rows of the entity after the notices, want 1", len(rows))
	}
	if rows := entityRows(t, c, victim, r.Position); len(rows) != 1 {
		t.Fatalf("after forged forget notices, the read model holds %d rows of the live victim, want 1", len(rows))
	}
	if got := ignoredNotices(t, n); got != float64(len(forged)) {
		t.Fatalf("ignored notices counted: %v, want %d", got, len(forged))
	}
	if rd, err := c.Read(t.Context(), victim); err != nil || rd.Version != 2 {
		t.Fatalf("the victim after forged notices: %+v, %v", rd, err)
	}

	// The real forget still reaches the read model.
	if _, err := c.Forget(t.Context(), victim, "test", ""); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(entityRows(t, c, victim, "")) > 0 {
		if time.Now().After(deadline) {
			t.Fatal("after a real forget, the read model still holds the victim")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if rows := entityRows(t, c, other, ""); len(rows) != 1 {
		t.Fatalf("the forget dropped the neighbour too: %d rows", len(rows))
	}
}

// TestRebuiltShardBelievesOnlyConfirmedForgets: a node that takes a shard
// over catches its copy up from the stream, where forget notices name
// entities by pseudonym. The real forget reaches the copy (the entity's rows
// go, its events in the stream are skipped), forged notices for a live
// entity (by pseudonym and by id) change nothing.
func TestRebuiltShardBelievesOnlyConfirmedForgets(t *testing.T) {
	if testing.Short() {
		t.Skip("moves a shard between two nodes three times: seconds")
	}
	first := kumatest.Start(t, func(c *app.Config) { c.NodeName = "n1"; c.Shards = 8 })
	second := joinShardnode(t, first, "n2")
	c := first.Client(client.Options{Timeout: 20 * time.Second})
	ctx := t.Context()
	waitStatus(t, c, "two nodes settled", settled("n1", "n2"))
	ids := sameShard("rebuilt", 2, 8)
	gone, kept := ids[0], ids[1]
	shard := placement.ShardOf(gone, 8)
	for _, id := range ids {
		if _, err := c.Append(ctx, id, markerEvents(2)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	apps := map[string]*app.App{"n1": first.App, "n2": second}
	owner := shardLine(t, st, shard).Owner
	other := map[string]string{"n1": "n2", "n2": "n1"}[owner]
	move := func(to string) {
		t.Helper()
		if _, err := c.Migrate(ctx, shard, to); err != nil {
			t.Fatal(err)
		}
		waitStatus(t, c, "shard moved to "+to, func(st *kuma.StatusReply) bool {
			s := shardLine(t, st, shard)
			return s.Owner == to && s.Moving == "" && s.Error == ""
		})
	}
	// The other node gets a copy holding both entities, then hands back.
	move(other)
	move(owner)

	ps, err := vaultclient.New(first.NC, 0).Pseudonyms(ctx, "default", ids)
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(first.NC)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 25, 14, 3, 7, 0, time.UTC)
	for _, f := range []kuma.ForgottenNotice{
		{Context: "default", Shard: shard, Pseudonym: ps[1], At: at},
		{Context: "default", Shard: shard, Entity: kept, At: at},
	} {
		b, _ := json.Marshal(f)
		if _, err := js.Publish(ctx, kuma.ForgottenSubject("default", shard), b); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Forget(ctx, gone, "test", ""); err != nil {
		t.Fatal(err)
	}
	// The other node's copy still has both; it catches up from the stream.
	move(other)
	r, err := c.Read(ctx, kept)
	if err != nil || r.Version != 2 {
		t.Fatalf("the live entity after the take-over: %+v, %v; want version 2", r, err)
	}
	if _, err := c.Read(ctx, gone); kuma.ErrorCode(err) != kuma.CodeEntityForgotten {
		t.Fatalf("the forgotten entity after the take-over: %v, want entity_forgotten", err)
	}
	path := filepath.Join(apps[other].Config().DataDir, "default", fmt.Sprintf("shard-%03d.db", shard))
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for id, want := range map[string]int{gone: 0, kept: 2} {
		var events int
		if err := db.QueryRow(`SELECT COALESCE(SUM(n), 0) FROM events WHERE entity = ?`, id).Scan(&events); err != nil {
			t.Fatal(err)
		}
		if events != want {
			t.Fatalf("the new owner's file holds %d events of %s, want %d", events, id, want)
		}
	}
}

// TestRelayLeavesOutEventsOfAnEntityForgottenBeforePublish: events
// committed but not yet published when their entity is forgotten are never
// published (their key is gone: they could be named by nothing), and the
// relay goes on with the shard's other events.
func TestRelayLeavesOutEventsOfAnEntityForgottenBeforePublish(t *testing.T) {
	var relayArmed, forgetArmed atomic.Bool
	relayHeld, relayGo := make(chan struct{}, 1), make(chan struct{})
	forgetHeld, forgetGo := make(chan struct{}, 1), make(chan struct{})
	n := kumatest.Start(t, func(c *app.Config) {
		c.Failpoint = func(name string) {
			switch {
			case name == "relay-before-publish" && relayArmed.CompareAndSwap(true, false):
				relayHeld <- struct{}{}
				<-relayGo
			case name == "forget-after-shred" && forgetArmed.CompareAndSwap(true, false):
				forgetHeld <- struct{}{}
				<-forgetGo
			}
		}
	})
	c := n.Client(client.Options{})
	ids := sameShard("late", 2, n.Cfg.Shards)
	gone, kept := ids[0], ids[1]
	// The relay holds a message of kept's first event...
	relayArmed.Store(true)
	if _, err := c.Append(t.Context(), kept, markerEvents(1)); err != nil {
		t.Fatal(err)
	}
	<-relayHeld
	// ... while gone's events are committed behind it, and gone is
	// forgotten up to its key's shred.
	if _, err := c.Append(t.Context(), gone, markerEvents(2)); err != nil {
		t.Fatal(err)
	}
	forgetArmed.Store(true)
	forgot := make(chan error, 1)
	go func() { _, err := c.Forget(t.Context(), gone, "test", ""); forgot <- err }()
	<-forgetHeld
	close(relayGo)
	// The relay publishes kept's event and goes on past gone's (its rows
	// are still there: the forget has not deleted them yet).
	if _, err := c.Append(t.Context(), kept, markerEvents(1)); err != nil {
		t.Fatal(err)
	}
	streamed := kumatest.StreamEvents(t, n.NC, "default", 2)
	close(forgetGo)
	if err := <-forgot; err != nil {
		t.Fatal(err)
	}
	streamed = kumatest.StreamEvents(t, n.NC, "default", 2)
	total := 0
	for name, evs := range streamed {
		total += len(evs)
		if name != kept {
			t.Fatalf("the stream has %d events of %q, want only %s's", len(evs), name, kept)
		}
	}
	if total != 2 {
		t.Fatalf("the stream has %d events, want kept's 2", total)
	}
}
