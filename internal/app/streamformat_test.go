package app_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/nats-io/nats.go/jetstream"
)

// TestStreamFormat2AndTheGate: a node on its own writes stream format 2
// (Kuma-Format: 2), and its projector applies it; while a member that
// does not advertise format 2 is in the members bucket the relay writes
// format 1, and format 2 again once it is gone. The shard's subject then
// holds both formats, which the projector applies in order and from which
// the shard, its file moved aside, is rebuilt (the catch-up).
func TestStreamFormat2AndTheGate(t *testing.T) {
	dir := t.TempDir()
	n := kumatest.Start(t, func(c *app.Config) { c.DataDir = dir })
	c := n.Client(client.Options{})
	ctx := t.Context()
	js, stream := defaultStream(t, n)
	const entity = "fmt2-1"
	shard := placement.ShardOf(entity, n.Cfg.Shards)
	subject := kuma.EventsSubject("default", shard)
	version := int64(0)
	appendUntil := func(format string) { version = appendUntilFormat(t, c, stream, entity, format, 20*time.Second) }
	appendUntil("2")

	// A member of an older build (no stream_formats), serving another
	// context so that no shard of this one is placed on it, heartbeats.
	kv, err := js.KeyValue(ctx, cluster.MembersBucket)
	if err != nil {
		t.Fatal(err)
	}
	hctx, stopOld := context.WithCancel(ctx)
	oldGone := make(chan struct{})
	go func() {
		defer close(oldGone)
		rec, _ := json.Marshal(cluster.Member{Node: "old-node", Started: time.Now(), Contexts: []string{"elsewhere"}})
		for hctx.Err() == nil {
			_, _ = kv.Put(hctx, "old-node", rec)
			select {
			case <-hctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	appendUntil("")
	appendUntil("") // one more of format 1 now that it is settled
	stopOld()
	<-oldGone
	if err := kv.Delete(ctx, "old-node"); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatal(err)
	}
	appendUntil("2")
	r, err := c.Append(ctx, entity, markerEvents(2), client.IdempotencyKey("k-last"))
	if err != nil {
		t.Fatal(err)
	}
	version = r.LastVersion

	// The projector applied every message of both formats.
	rows := entityRows(t, c, "fmt2-", r.Position)
	if len(rows) != 1 || fmt.Sprint(rows[0]["version"]) != fmt.Sprint(version) {
		t.Fatalf("entities projection: %v, want %s at version %d", rows, entity, version)
	}
	// The stream holds each version once, in order, in both formats.
	formats := map[string]int{}
	waitPublished(t, stream, subject, r.Position)
	evs := kumatest.StreamEvents(t, n.NC, "default", int(version))
	for i, e := range evs[entity] {
		if e.Version != int64(i+1) {
			t.Fatalf("stream event %d has version %d", i, e.Version)
		}
	}
	if last := evs[entity][len(evs[entity])-1]; last.IdempotencyKey == "" || last.FirstVersion != version-1 {
		t.Fatalf("the idempotent append's last event: key %q first version %d", last.IdempotencyKey, last.FirstVersion)
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
		m, err := stream.GetMsg(ctx, seq)
		if err != nil || m.Subject != subject || m.Header.Get(kuma.HeaderEpoch) != "" {
			continue
		}
		formats[m.Header.Get(kuma.HeaderFormat)]++
	}
	if formats[""] < 2 || formats["2"] < 2 {
		t.Fatalf("messages on %s by %s header: %v; want both formats", subject, kuma.HeaderFormat, formats)
	}

	// The shard rebuilt from the stream of both formats has every event.
	// No snapshot of it was uploaded (a node alone hands nothing off, and
	// uploads its first after a minute), so the rebuild reads the stream.
	if obs, err := js.ObjectStore(ctx, cluster.SnapshotsBucket); err == nil {
		for _, name := range []string{fmt.Sprintf("default/shard-%d", shard), fmt.Sprintf("default/shard-%d.b", shard)} {
			if _, err := obs.GetInfo(ctx, name); !errors.Is(err, jetstream.ErrObjectNotFound) {
				t.Fatalf("snapshot %s: %v; the rebuild would not come from the stream alone", name, err)
			}
		}
	} else if !errors.Is(err, jetstream.ErrBucketNotFound) && !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Fatal(err)
	}
	n.Stop()
	path := filepath.Join(dir, "default", fmt.Sprintf("shard-%03d.db", shard))
	aside := t.TempDir()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if err := os.Rename(path+suffix, filepath.Join(aside, "x"+suffix)); err != nil && (suffix == "" || !errors.Is(err, os.ErrNotExist)) {
			t.Fatal(err)
		}
	}
	n.Restart()
	c = n.Client(client.Options{})
	h, err := c.History(ctx, entity, 1, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(h.Events)) != version {
		t.Fatalf("rebuilt from the stream: %d events, want %d", len(h.Events), version)
	}
	again, err := c.Append(ctx, entity, markerEvents(2), client.IdempotencyKey("k-last"))
	if err != nil || !again.Duplicate || again.LastVersion != version {
		t.Fatalf("the idempotent append retried after the rebuild: %+v, %v; want a duplicate at %d", again, err, version)
	}
	t.Logf("%d events on %s in messages of formats %v", version, subject, formats)
}

// waitPublished returns the last message on subject once the stream holds
// position pos there.
func waitPublished(t *testing.T, stream jetstream.Stream, subject, pos string) *jetstream.RawStreamMsg {
	t.Helper()
	want, err := kuma.ParsePosition(pos)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		m, err := stream.GetLastMsgForSubject(t.Context(), subject)
		if err == nil {
			if p, err := kuma.ParsePosition(m.Header.Get(kuma.HeaderLastPosition)); err == nil && p.Seq >= want.Seq {
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stream does not reach %s on %s: %v", pos, subject, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// appendUntilFormat appends to entity until the last message on its
// shard's subject has the Kuma-Format header format ("" for format 1),
// and returns the entity's version.
func appendUntilFormat(t *testing.T, c *client.Client, stream jetstream.Stream, entity, format string, within time.Duration) int64 {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		r, err := c.Append(t.Context(), entity, markerEvents(3))
		if err != nil {
			t.Fatal(err)
		}
		p, _ := kuma.ParsePosition(r.Position)
		last := waitPublished(t, stream, kuma.EventsSubject("default", p.Shard), r.Position)
		if got := last.Header.Get(kuma.HeaderFormat); got == format {
			return r.LastVersion
		} else if time.Now().After(deadline) {
			t.Fatalf("the relay still writes %s %q, want %q", kuma.HeaderFormat, got, format)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestStreamFormatWaitsForOldProjectorDurables: a projector on its own is
// no member; a durable of one from before format 2 (no
// kuma_stream_formats in its metadata) holds the relays at format 1 until
// it is deleted.
func TestStreamFormatWaitsForOldProjectorDurables(t *testing.T) {
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	ctx := t.Context()
	_, stream := defaultStream(t, n)
	appendUntilFormat(t, c, stream, "dur-1", "2", 20*time.Second)
	_, err := stream.CreateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: "old_projector", FilterSubject: kuma.EventsWildcard("default"), AckPolicy: jetstream.AckExplicitPolicy,
		Metadata: map[string]string{kuma.ConsumerMetaNode: "old-host", "kuma_projection": "entities"},
	})
	if err != nil {
		t.Fatal(err)
	}
	// The durables are looked at every 10 s.
	appendUntilFormat(t, c, stream, "dur-1", "", 30*time.Second)
	if err := stream.DeleteConsumer(ctx, "old_projector"); err != nil {
		t.Fatal(err)
	}
	appendUntilFormat(t, c, stream, "dur-1", "2", 30*time.Second)
}

// defaultStream is the node's JetStream and the default context's stream.
func defaultStream(t *testing.T, n *kumatest.Node) (jetstream.JetStream, jetstream.Stream) {
	t.Helper()
	js, err := jetstream.New(n.NC)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(t.Context(), kuma.StreamName("default"))
	if err != nil {
		t.Fatal(err)
	}
	return js, stream
}
