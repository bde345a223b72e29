package natsbus_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kumadb/kuma/pkg/natsbus"
)

// TestStandaloneServer: without cluster settings the server is one
// JetStream peer, answers at once and holds one-replica streams only.
func TestStandaloneServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	srv := startMember(t, natsbus.ServerConfig{})
	nc := connect(t, srv)
	if err := natsbus.WaitJetStream(ctx, nc); err != nil {
		t.Fatalf("WaitJetStream: %v", err)
	}
	peers, err := natsbus.JetStreamPeers(ctx, nc)
	if err != nil || peers != 1 {
		t.Fatalf("JetStreamPeers: got %d, %v, want 1", peers, err)
	}
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "R1", Subjects: []string{"r1"}, Replicas: natsbus.Replicas(peers)}); err != nil {
		t.Fatalf("R1 stream: %v", err)
	}
	if _, err := js.Publish(ctx, "r1", []byte("x")); err != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "R3", Subjects: []string{"r3"}, Replicas: 3}); err == nil {
		t.Fatal("R3 stream on a standalone server: got nil error")
	}
}

// TestStandaloneStoreCarriedIntoCluster: a standalone store's streams
// would be deleted as orphans by a clustered server, so a clustered start
// over it exports them first, and RestoreExport puts them back once the
// cluster's JetStream answers, with their sequences, messages, KV
// revisions and consumers. Joining an existing cluster with it is refused;
// a store that was clustered before starts clustered again as it is.
func TestStandaloneStoreCarriedIntoCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	store := t.TempDir()
	srv, err := natsbus.StartServer(ctx, natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: store})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	keep, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		if _, err := js.Publish(ctx, fmt.Sprintf("keep.%d", i), []byte(fmt.Sprintf("m%d", i)), jetstream.WithMsgID(fmt.Sprintf("id-%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	// A hole in the sequence, as a shredded message leaves.
	if err := keep.SecureDeleteMsg(ctx, 3); err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "LEASES"})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a", "b", "a"} {
		if _, err := kv.Put(ctx, k, []byte("v-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, "KEEP", jetstream.ConsumerConfig{Durable: "proj", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(2)
	if err != nil {
		t.Fatal(err)
	}
	for m := range batch.Messages() {
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
	}
	nc.Close()
	srv.Shutdown()
	srv.WaitForShutdown()

	_, err = natsbus.StartServer(ctx, natsbus.ServerConfig{Listen: "127.0.0.1:-1", StoreDir: store, ServerName: "a", ClusterListen: "127.0.0.1:-1",
		Routes: []string{"nats://127.0.0.1:1"}})
	if err == nil || !strings.Contains(err.Error(), "standalone") || !strings.Contains(err.Error(), "no --join") {
		t.Fatalf("joining a cluster with a standalone store: got %v, want a refusal that says to start it with no --join", err)
	}
	if natsbus.PendingExport(store) {
		t.Fatal("a refused join exported the store")
	}

	first := startMember(t, natsbus.ServerConfig{ServerName: "a", StoreDir: store, ClusterListen: "127.0.0.1:-1"})
	if !natsbus.PendingExport(store) {
		t.Fatal("a clustered start over a standalone store left no export")
	}
	if _, err := os.Stat(filepath.Join(store, "jetstream.standalone", "$G", "streams", "KEEP")); err != nil {
		t.Fatalf("the old store is not kept aside: %v", err)
	}
	ncA := connect(t, first)
	stop, err := natsbus.ServeConversion(ncA, "a")
	if err != nil {
		t.Fatal(err)
	}
	second := startMember(t, natsbus.ServerConfig{ServerName: "b", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://" + first.ClusterAddr().String()}})
	ncB := connect(t, second)
	if err := natsbus.WaitJetStream(ctx, ncA); err != nil {
		t.Fatal(err)
	}
	// The joining member waits while the first converts...
	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	err = natsbus.WaitConversions(wctx, ncB, log)
	wcancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitConversions during a conversion: got %v, want it to wait until its deadline", err)
	}
	names, err := natsbus.RestoreExport(ctx, ncA, store, log)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if want := []string{"KEEP", "KV_LEASES"}; !slices.Equal(names, want) {
		t.Errorf("restored %v, want %v", names, want)
	}
	stop()
	// ...and goes on once it is done.
	if err := natsbus.WaitConversions(ctx, ncB, log); err != nil {
		t.Fatalf("WaitConversions after the conversion: %v", err)
	}
	if natsbus.PendingExport(store) {
		t.Error("the export is still pending after the restore")
	}

	jsB, _ := jetstream.New(ncB) // read through the other member: it is the cluster's
	st, err := jsB.Stream(ctx, "KEEP")
	if err != nil {
		t.Fatal(err)
	}
	if got := st.CachedInfo().State; got.Msgs != 4 || got.FirstSeq != 1 || got.LastSeq != 5 {
		t.Errorf("KEEP state: got %d msgs, seq %d..%d; want 4, 1..5", got.Msgs, got.FirstSeq, got.LastSeq)
	}
	for _, seq := range []uint64{1, 2, 4, 5} {
		m, err := st.GetMsg(ctx, seq)
		if err != nil || string(m.Data) != fmt.Sprintf("m%d", seq) {
			t.Errorf("KEEP seq %d: got %v (%v), want m%d", seq, m, err, seq)
		}
	}
	if _, err := st.GetMsg(ctx, 3); err == nil {
		t.Error("KEEP seq 3 was deleted standalone and is back")
	}
	// The message ids' duplicate window does not come along (nats-server
	// rebuilds it for a restored stream in a cluster from nothing): Kuma's
	// relays publish with a per-subject compare-and-set, which does.
	kvB, err := jsB.KeyValue(ctx, "LEASES")
	if err != nil {
		t.Fatal(err)
	}
	if e, err := kvB.Get(ctx, "a"); err != nil || string(e.Value()) != "v-a" || e.Revision() != 3 {
		t.Errorf("LEASES a: got %v, %v; want v-a at revision 3", e, err)
	}
	ci, err := st.Consumer(ctx, "proj")
	if err != nil {
		t.Fatalf("the durable consumer did not come along: %v", err)
	}
	if got := ci.CachedInfo().AckFloor.Stream; got != 2 {
		t.Errorf("consumer proj: ack floor %d, want 2", got)
	}

	// A crash after the restore but before the export was removed runs it
	// again: what the cluster holds with the same state counts as restored.
	if err := os.MkdirAll(filepath.Join(store, "standalone-export"), 0o700); err != nil {
		t.Fatal(err)
	}
	meta, _ := json.Marshal(server.JSApiStreamRestoreRequest{
		Config: server.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}, Storage: server.FileStorage},
		State:  server.StreamState{Msgs: 4, LastSeq: 5}})
	if err := os.WriteFile(filepath.Join(store, "standalone-export", "KEEP.json"), meta, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := natsbus.RestoreExport(ctx, ncA, store, log); err != nil {
		t.Fatalf("restore again: %v", err)
	}
	// One the cluster holds with another state is not this node's: refused.
	if err := os.MkdirAll(filepath.Join(store, "standalone-export"), 0o700); err != nil {
		t.Fatal(err)
	}
	meta, _ = json.Marshal(server.JSApiStreamRestoreRequest{
		Config: server.StreamConfig{Name: "KEEP", Subjects: []string{"keep.>"}, Storage: server.FileStorage},
		State:  server.StreamState{Msgs: 40, LastSeq: 50}})
	if err := os.WriteFile(filepath.Join(store, "standalone-export", "KEEP.json"), meta, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := natsbus.RestoreExport(ctx, ncA, store, log); err == nil || !strings.Contains(err.Error(), "already holds a stream KEEP") {
		t.Fatalf("restore over another stream: got %v, want a refusal", err)
	}
	if !natsbus.PendingExport(store) {
		t.Error("a refused restore removed the export")
	}
}

// TestClusteredStoreRestartsClustered: a store that was clustered before
// starts clustered again, its streams known to the meta group.
func TestClusteredStoreRestartsClustered(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	clustered := t.TempDir()
	first := startMember(t, natsbus.ServerConfig{ServerName: "a", StoreDir: clustered, ClusterListen: "127.0.0.1:-1"})
	startMember(t, natsbus.ServerConfig{ServerName: "b", ClusterListen: "127.0.0.1:-1", Routes: []string{"nats://" + first.ClusterAddr().String()}})
	ncA := connect(t, first)
	if err := natsbus.WaitJetStream(ctx, ncA); err != nil {
		t.Fatal(err)
	}
	jsA, _ := jetstream.New(ncA)
	if _, err := jsA.CreateStream(ctx, jetstream.StreamConfig{Name: "C", Subjects: []string{"c"}}); err != nil {
		t.Fatal(err)
	}
	addr := first.ClusterAddr().String()
	first.Shutdown()
	first.WaitForShutdown()
	again := startMember(t, natsbus.ServerConfig{ServerName: "a", StoreDir: clustered, ClusterListen: addr})
	if natsbus.PendingExport(clustered) {
		t.Error("a clustered store was exported as a standalone one")
	}
	ncAgain := connect(t, again)
	if err := natsbus.WaitJetStream(ctx, ncAgain); err != nil {
		t.Fatalf("restarted first member: %v", err)
	}
	jsAgain, _ := jetstream.New(ncAgain)
	if _, err := jsAgain.Stream(ctx, "C"); err != nil {
		t.Fatalf("stream C after the first member's restart: %v", err)
	}
}
