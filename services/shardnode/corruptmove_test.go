//go:build cluster

package shardnode_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/damage"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/services/shardnode"
)

// joinShardnode starts a shardnode alone (no NATS server, router or
// keyvault of its own) on dir that joins the cluster at natsURL and logs
// into logs; it stops with the test.
func joinShardnode(t *testing.T, name, dir, natsURL string, logs io.Writer) *app.App {
	t.Helper()
	a, err := app.New(app.Config{Target: app.ModuleShardnode, NodeName: name, DataDir: dir, Shards: corruptShards,
		NATSURL: natsURL, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	err = a.Start(ctx)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = a.Stop(ctx)
	})
	return a
}

// settleShards waits until neither node has a move under way, b serves a
// shard, and the two serve every shard between them, failing the test after
// 90 s.
func settleShards(t *testing.T, a, b *shardnode.Service) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for len(a.Moves()) > 0 || len(b.Moves()) > 0 || len(b.Stats()) == 0 || len(a.Stats())+len(b.Stats()) != corruptShards {
		if time.Now().After(deadline) {
			t.Fatalf("shards did not settle: the first node serves %d, the second %d, moving %v %v",
				len(a.Stats()), len(b.Stats()), a.Moves(), b.Moves())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCorruptShardMovesToAnotherNode: in a cluster of two, a page of a
// shard goes bad under the node that serves it. That node takes the shard
// out of service, as alone, but says so in its member record, so placement
// gives the shard to the other node, which takes it (from the event
// stream) and serves every acknowledged event. Readers that keep reading
// the shard's entities meanwhile see one failure, the read that found the
// damage: the damaged node answers unavailable (retried by clients) while
// the shard moves, and stops answering once the other node serves it.
// Before, the shard's place stayed on the damaged node, nobody took it, and
// every request was answered internal until an operator came.
func TestCorruptShardMovesToAnotherNode(t *testing.T) {
	ctx := context.Background()
	logs1, logs2 := &corruptLog{}, &corruptLog{}
	n1 := corruptStart(t, t.TempDir(), logs1) // NATS, keyvault, router, and a shardnode
	c := n1.Client(client.Options{Timeout: 20 * time.Second})
	acked, byShard := corruptWriteAll(t, c, 6, 20, 300)
	corruptSettle(t, n1)

	// A second shardnode joins and takes its share from n1: its files come
	// from n1's snapshots, and nothing is read from them yet.
	dir2 := t.TempDir()
	n2 := joinShardnode(t, "n2", dir2, n1.App.ClientURL(), logs2)
	served := func(a *app.App, shard int) bool {
		for _, st := range a.Shardnode().Stats() {
			if st.Shard == shard {
				return true
			}
		}
		return false
	}
	bad := -1
	deadline := time.Now().Add(60 * time.Second)
	for bad < 0 {
		if len(n1.Shardnode().Moves()) == 0 && len(n2.Shardnode().Moves()) == 0 &&
			len(n1.Shardnode().Stats())+len(n2.Shardnode().Stats()) == corruptShards {
			for _, st := range n2.Shardnode().Stats() {
				bad = st.Shard
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("shards did not settle with some on n2: n1 %d, n2 %d", len(n1.Shardnode().Stats()), len(n2.Shardnode().Stats()))
		}
		time.Sleep(50 * time.Millisecond)
	}
	corruptWaitLog(t, logs2, "shard file checked", fmt.Sprintf("shard=%d", bad))

	// The damage: the type bit of an events leaf page of n2's copy.
	path := corruptShardFile(dir2, bad)
	page, pageSize, entity := corruptEventsLeaf(t, path)
	damage.Flip(t, path, (page-1)*pageSize, 0x01)
	t.Logf("flipped page %d of shard %d on n2 (events of %s)", page, bad, entity)

	// The first read of that page finds the damage, and is answered
	// internal: it cannot be told from a failed disk.
	_, err := c.Read(ctx, entity)
	var kerr *kuma.Error
	if !errors.As(err, &kerr) || kerr.Code != kuma.CodeInternal || !strings.Contains(kerr.Message, "is corrupt") {
		t.Fatalf("read of %s on the damaged page: %v; want internal, corrupt", entity, err)
	}
	corruptWaitLog(t, logs2, "shard file is corrupt", fmt.Sprintf("shard=%d", bad))
	for served(n2, bad) {
		time.Sleep(10 * time.Millisecond)
	}

	// From then on, readers of the shard's entities get the acknowledged
	// state, however long the move takes: unavailable, while it moves, is
	// retried by the client.
	var mu sync.Mutex
	var failures []error
	var reads int
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, e := range byShard[bad] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				r, err := c.Read(rctx, e)
				cancel()
				if err == nil && r.Version != int64(len(acked[e])) {
					err = fmt.Errorf("version %d, %d acknowledged", r.Version, len(acked[e]))
				}
				mu.Lock()
				reads++
				if err != nil {
					failures = append(failures, fmt.Errorf("read %s: %w", e, err))
				}
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}

	deadline = time.Now().Add(60 * time.Second)
	for !served(n1.App, bad) {
		if time.Now().After(deadline) {
			close(stop)
			wg.Wait()
			t.Fatalf("shard %d, damaged on n2, was not taken by n1 within 60 s (n1 serves %d shards)", bad, len(n1.Shardnode().Stats()))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("n1 serves shard %d", bad)
	corruptWaitLog(t, logs2, "stops answering for it", fmt.Sprintf("shard=%d", bad))
	// A while of reads with only n1 answering for the shard.
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()

	for _, err := range failures {
		t.Errorf("a read failed while the shard moved: %v", err)
	}
	if err := corruptVerify(ctx, c, acked); err != nil {
		t.Fatalf("after the move: %v", err)
	}
	if _, err := corruptAppend(ctx, c, acked, byShard[bad][0], 1, 10); err != nil {
		t.Fatalf("append to the moved shard: %v", err)
	}
	t.Logf("%d reads while shard %d moved off n2, %d failed", reads, bad, len(failures))
}
