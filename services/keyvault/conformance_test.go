package keyvault_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// features says what a store offers beyond what every store must do, so
// that the suite runs each behaviour where it applies instead of skipping.
type features struct {
	// NeedsNATS: the store lives in JetStream, so even the in-process
	// path needs a connection.
	NeedsNATS bool
	// Shared: several keyvault instances (processes, nodes) may use one
	// storage at once.
	Shared bool
}

// backend is one store under the conformance suite.
type backend struct {
	name     string
	features features
	// storage makes a fresh, empty storage; nc is the test's NATS
	// connection (nil for a file store used in process).
	storage func(t *testing.T, nc *nats.Conn) *storage
}

// storage is where a backend's keys live in one test: a file, or the
// bucket on one NATS server. Every instance started on it sees the same keys.
type storage struct {
	store string
	path  string
	url   string // the NATS server holding the bucket
}

var backends = []backend{
	{name: "file", storage: func(t *testing.T, _ *nats.Conn) *storage {
		return &storage{store: keyvault.StoreFile, path: dbPath(t)}
	}},
	{name: "jetstream", features: features{NeedsNATS: true, Shared: true}, storage: func(t *testing.T, nc *nats.Conn) *storage {
		return &storage{store: keyvault.StoreJetStream, url: nc.ConnectedUrl()}
	}},
}

func (st *storage) config(master []byte) keyvault.Config {
	return keyvault.Config{Store: st.store, Path: st.path, MasterKey: master, Now: now}
}

// connect opens a connection of its own to the storage's server, as
// another process would.
func (st *storage) connect(t *testing.T) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(st.url)
	if err != nil {
		t.Fatalf("connect %s: %v", st.url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// build makes an instance on the storage without starting it.
func (st *storage) build(t *testing.T, master []byte, nc *nats.Conn) *keyvault.Service {
	t.Helper()
	kv, err := keyvault.New(st.config(master), nc)
	if err != nil {
		t.Fatalf("keyvault.New: %v", err)
	}
	return kv
}

// start builds and starts an instance on the storage, stopped at the end
// of the test.
func (st *storage) start(t *testing.T, master []byte, nc *nats.Conn) *keyvault.Service {
	t.Helper()
	kv := st.build(t, master, nc)
	if err := kv.Start(t.Context()); err != nil {
		t.Fatalf("keyvault.Start (%s): %v", st.store, err)
	}
	t.Cleanup(func() { _ = kv.Stop(context.Background()) })
	return kv
}

// forEachBackend runs f once per store, with a fresh storage and the NATS
// connection the store needs (nil for a file).
func forEachBackend(t *testing.T, f func(t *testing.T, b backend, st *storage, nc *nats.Conn)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			var nc *nats.Conn
			if b.features.NeedsNATS {
				nc = startNATS(t)
			}
			f(t, b, b.storage(t, nc), nc)
		})
	}
}

func TestConformanceRestartKeepsKeys(t *testing.T) {
	forEachBackend(t, func(t *testing.T, _ backend, st *storage, nc *nats.Conn) {
		master := envelope.NewRandomKey()
		kv := st.start(t, master, nc)
		want := newKeys(t, kv, 20)
		rec, err := kv.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "user_0", EventsDeleted: 4, At: fixedNow})
		if err != nil {
			t.Fatal(err)
		}
		gone := want["user_0"]
		delete(want, "user_0")
		stopVault(t, kv)

		kv2 := st.start(t, master, nc)
		for e, r := range want {
			got, err := kv2.DataKey(t.Context(), "default", e, false)
			if err != nil || !bytes.Equal(got.Key, r.Key) || got.Pseudonym != r.Pseudonym {
				t.Errorf("%s after restart: got %x %q, %v; want %x %q", e, got.Key, got.Pseudonym, err, r.Key, r.Pseudonym)
			}
		}
		_, err = kv2.DataKey(t.Context(), "default", "user_0", true)
		wantCode(t, "DataKey of a shredded entity after restart", err, kuma.ErrEntityForgotten)
		_, err = kv2.KeyByPseudonym(t.Context(), "default", gone.Pseudonym)
		wantCode(t, "KeyByPseudonym of a shredded entity after restart", err, kuma.ErrEntityForgotten)
		got, err := kv2.Forgotten(t.Context(), "default", "user_0")
		if err != nil || got == nil || got.Entity != rec.Entity || !got.ForgottenAt.Equal(rec.ForgottenAt) || got.EventsDeleted != rec.EventsDeleted {
			t.Errorf("Forgotten after restart: got %+v, %v; want %+v", got, err, rec)
		}
	})
}

func TestConformanceWrongMasterKeyIsRefused(t *testing.T) {
	forEachBackend(t, func(t *testing.T, _ backend, st *storage, nc *nats.Conn) {
		master := envelope.NewRandomKey()
		kv := st.start(t, master, nc)
		k := mustKey(t, kv, "default", "user_1", true)
		stopVault(t, kv)

		wrong := st.build(t, envelope.NewRandomKey(), nc)
		err := wrong.Start(t.Context())
		if err == nil {
			_ = wrong.Stop(context.Background())
			t.Fatal("Start with another master key: got nil, want an error")
		}
		if !strings.Contains(err.Error(), "master key") || !strings.Contains(err.Error(), "another key") {
			t.Errorf("Start with another master key: got %q, want it to say the master key is another one", err)
		}
		_ = wrong.Stop(context.Background())

		kv2 := st.start(t, master, nc)
		if got := mustKey(t, kv2, "default", "user_1", false); !bytes.Equal(got, k) {
			t.Errorf("after a refused start: got %x, want %x", got, k)
		}
	})
}

// TestConformanceInstancesAgree: several instances on one storage, each on
// its own connection as on its own node, hand out one key per entity
// whoever creates it, name it by one pseudonym, and see each other's
// forgets at once.
func TestConformanceInstancesAgree(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, st *storage, nc *nats.Conn) {
		if !b.features.Shared {
			return // one instance per file: the op loop is the file's single writer
		}
		master := envelope.NewRandomKey()
		a := st.start(t, master, st.connect(t))
		c := st.start(t, master, st.connect(t))
		const entities, perInstance = 40, 3
		var (
			mu   sync.Mutex
			got  = map[string][]vaultclient.KeyReply{}
			errs []error
			wg   sync.WaitGroup
		)
		for i := range entities * perInstance {
			for _, kv := range []*keyvault.Service{a, c} {
				e := fmt.Sprintf("entity_%d", i%entities)
				wg.Go(func() {
					r, err := kv.DataKey(t.Context(), "default", e, true)
					mu.Lock()
					defer mu.Unlock()
					if err != nil {
						errs = append(errs, fmt.Errorf("%s: %w", e, err))
						return
					}
					got[e] = append(got[e], r)
				})
			}
		}
		wg.Wait()
		for _, err := range errs {
			t.Errorf("concurrent DataKey from two instances: %v", err)
		}
		for e, rs := range got {
			for _, r := range rs[1:] {
				if !bytes.Equal(r.Key, rs[0].Key) || r.Pseudonym != rs[0].Pseudonym {
					t.Fatalf("%s: two instances handed out %x (%s) and %x (%s), want one key and one pseudonym", e, rs[0].Key, rs[0].Pseudonym, r.Key, r.Pseudonym)
				}
			}
		}
		ps, err := c.Pseudonyms(t.Context(), "default", []string{"entity_1"})
		if err != nil || ps[0] != got["entity_1"][0].Pseudonym {
			t.Fatalf("Pseudonyms on the other instance: %q, %v; want %q", ps, err, got["entity_1"][0].Pseudonym)
		}
		if r, err := c.KeyByPseudonym(t.Context(), "default", ps[0]); err != nil || r.Entity != "entity_1" || !bytes.Equal(r.Key, got["entity_1"][0].Key) {
			t.Fatalf("KeyByPseudonym on the other instance: %+v, %v", r, err)
		}

		rec, err := a.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "entity_1", EventsDeleted: 3, At: fixedNow})
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.DataKey(t.Context(), "default", "entity_1", true)
		wantCode(t, "DataKey on the other instance after a shred", err, kuma.ErrEntityForgotten)
		_, err = c.KeyByPseudonym(t.Context(), "default", ps[0])
		wantCode(t, "KeyByPseudonym on the other instance after a shred", err, kuma.ErrEntityForgotten)
		if fr, err := c.ForgottenPseudonym(t.Context(), "default", ps[0]); err != nil || fr == nil || fr.EventsDeleted != 3 {
			t.Fatalf("ForgottenPseudonym on the other instance: %+v, %v", fr, err)
		}
		again, err := c.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "entity_1", EventsDeleted: 99})
		if err != nil || !again.ForgottenAt.Equal(rec.ForgottenAt) || again.EventsDeleted != 3 {
			t.Fatalf("Shred again on the other instance: %+v, %v; want the first record %+v", again, err, rec)
		}
	})
}

// TestConformanceShredRacesCreatesOfTwoInstances: creates on one instance
// race the shred on another; whatever the order, the entity ends forgotten
// with no key to be had on either.
func TestConformanceShredRacesCreatesOfTwoInstances(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend, st *storage, nc *nats.Conn) {
		if !b.features.Shared {
			return // TestConcurrentShredAndCreate covers one instance
		}
		master := envelope.NewRandomKey()
		a := st.start(t, master, st.connect(t))
		c := st.start(t, master, st.connect(t))
		var wg sync.WaitGroup
		errc := make(chan error, 200)
		for i := range 20 {
			e := fmt.Sprintf("race_%d", i)
			for range 4 {
				wg.Go(func() {
					if _, err := a.DataKey(t.Context(), "default", e, true); err != nil && !errors.Is(err, kuma.ErrEntityForgotten) {
						errc <- fmt.Errorf("DataKey(%s): %w", e, err)
					}
				})
			}
			wg.Go(func() {
				if _, err := c.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: e}); err != nil {
					errc <- fmt.Errorf("Shred(%s): %w", e, err)
				}
			})
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Errorf("got %v, want success or entity_forgotten", err)
		}
		for i := range 20 {
			e := fmt.Sprintf("race_%d", i)
			for _, kv := range []*keyvault.Service{a, c} {
				_, err := kv.DataKey(t.Context(), "default", e, true)
				wantCode(t, "DataKey after the race of "+e, err, kuma.ErrEntityForgotten)
			}
		}
	})
}

// TestImportFileIntoBucket: a node whose keys are in a file and that now
// runs the JetStream store loses none of them: the keys (with their
// pseudonyms) and the forgotten ids move into the bucket at start, the
// file keeps no key and is refused by the file store afterwards, and a
// second start imports nothing again.
func TestImportFileIntoBucket(t *testing.T) {
	path, master := dbPath(t), envelope.NewRandomKey()
	file := startVault(t, path, master, nil)
	want := newKeys(t, file, 10)
	gone := want["user_3"]
	delete(want, "user_3")
	if _, err := file.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "user_3", Reason: "asked", EventsDeleted: 5, At: fixedNow}); err != nil {
		t.Fatal(err)
	}
	stopVault(t, file)

	nc := startNATS(t)
	bucket := &storage{store: keyvault.StoreJetStream, path: path, url: nc.ConnectedUrl()}
	kv := bucket.start(t, master, nc)
	check := func(kv *keyvault.Service) {
		t.Helper()
		for e, r := range want {
			got, err := kv.DataKey(t.Context(), "default", e, false)
			if err != nil || !bytes.Equal(got.Key, r.Key) || got.Pseudonym != r.Pseudonym {
				t.Errorf("%s from the bucket: got %x %q, %v; want the file's %x %q", e, got.Key, got.Pseudonym, err, r.Key, r.Pseudonym)
			}
		}
		_, err := kv.DataKey(t.Context(), "default", "user_3", true)
		wantCode(t, "DataKey of an id forgotten in the file", err, kuma.ErrEntityForgotten)
		if rec, err := kv.ForgottenPseudonym(t.Context(), "default", gone.Pseudonym); err != nil || rec == nil || rec.EventsDeleted != 5 || !rec.ForgottenAt.Equal(fixedNow.UTC().Truncate(1000)) {
			t.Errorf("ForgottenPseudonym of an id forgotten in the file: %+v, %v", rec, err)
		}
	}
	check(kv)
	stopVault(t, kv)

	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM keys`).Scan(&n); err != nil || n != 0 {
		t.Errorf("keys left in the file after the import: %d, %v; want 0", n, err)
	}
	db.Close()
	refused := newVault(t, path, master, nil, nil)
	if err := refused.Start(t.Context()); err == nil || !strings.Contains(err.Error(), "moved to") {
		t.Errorf("file store on an imported file: got %v, want a refusal saying the keys moved", err)
	}
	_ = refused.Stop(context.Background())

	// Again: nothing left to import, the bucket still has it all.
	check(bucket.start(t, master, nc))
}

// TestImportRefusedIntoAnotherBucket: a bucket started by another keyvault
// has another id key; importing a file into it would change the file's
// pseudonyms, so the start is refused, saying so, and the file is kept.
func TestImportRefusedIntoAnotherBucket(t *testing.T) {
	path, master := dbPath(t), envelope.NewRandomKey()
	file := startVault(t, path, master, nil)
	k := mustKey(t, file, "default", "user_1", true)
	stopVault(t, file)

	nc := startNATS(t)
	other := &storage{store: keyvault.StoreJetStream, url: nc.ConnectedUrl()}
	stopVault(t, other.start(t, master, nc))
	bucket := &storage{store: keyvault.StoreJetStream, path: path, url: nc.ConnectedUrl()}
	kv := bucket.build(t, master, nc)
	err := kv.Start(t.Context())
	if err == nil || !strings.Contains(err.Error(), "pseudonyms") {
		_ = kv.Stop(context.Background())
		t.Fatalf("import into a bucket with another id key: got %v, want a refusal naming the pseudonyms", err)
	}
	if got := mustKey(t, startVault(t, path, master, nil), "default", "user_1", false); !bytes.Equal(got, k) {
		t.Errorf("the file after a refused import: got %x, want %x", got, k)
	}
}

// TestRotateRefusesAnImportedFile: once a file's keys are in the bucket,
// rotating the file would re-wrap nothing and leave the bucket under the
// old master key, so it is refused, saying why, and the file is unchanged.
func TestRotateRefusesAnImportedFile(t *testing.T) {
	path, master := dbPath(t), envelope.NewRandomKey()
	file := startVault(t, path, master, nil)
	mustKey(t, file, "default", "user_1", true)
	stopVault(t, file)
	nc := startNATS(t)
	bucket := &storage{store: keyvault.StoreJetStream, path: path, url: nc.ConnectedUrl()}
	stopVault(t, bucket.start(t, master, nc))
	n, err := keyvault.Rotate(t.Context(), path, master, envelope.NewRandomKey())
	if err == nil || n != 0 || !strings.Contains(err.Error(), "not supported") {
		t.Fatalf("Rotate of an imported file: got %d keys, %v; want a refusal saying the bucket's rotation is not supported", n, err)
	}
}

// TestJetStreamForgetErasesTheMessage: on one JetStream server (no Raft log
// to wait for; TestShredLeavesNoCopyOnAnyReplica, tag cluster, covers three)
// a forget leaves the wrapped key in no file of the store directory, where
// it was before.
func TestJetStreamForgetErasesTheMessage(t *testing.T) {
	srv, nc := kumatest.NATS(t)
	dir := srv.StoreDir() // every file JetStream writes
	kv := (&storage{store: keyvault.StoreJetStream, url: srv.ClientURL()}).start(t, envelope.NewRandomKey(), nc)
	var victim vaultclient.KeyReply
	for i := range 20 {
		r, err := kv.DataKey(t.Context(), "default", fmt.Sprintf("user_%d", i), true)
		if err != nil {
			t.Fatal(err)
		}
		if i == 7 {
			victim = r
		}
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(t.Context(), "KV_"+cluster.KeysBucket)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := st.GetLastMsgForSubject(t.Context(), "$KV."+cluster.KeysBucket+".k.default."+victim.Pseudonym)
	if err != nil {
		t.Fatal(err)
	}
	found := func() []string {
		var where []string
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				if b, err := os.ReadFile(path); err == nil && (bytes.Contains(b, msg.Data) || bytes.Contains(b, victim.Key)) {
					where = append(where, path)
				}
			}
			return nil
		})
		return where
	}
	if len(found()) == 0 {
		t.Fatal("before the forget no file holds the wrapped key: the search proves nothing")
	}
	if _, err := kv.Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "user_7"}); err != nil {
		t.Fatal(err)
	}
	if where := found(); len(where) > 0 {
		t.Errorf("after the forget the wrapped key is still in %v", where)
	}
	if _, err := st.GetMsg(t.Context(), msg.Sequence); err == nil {
		t.Error("after the forget the key's message is still in the stream")
	}
}

// TestJetStreamRefusesABucketThatCannotErase: a KUMA_KEYS made by `nats kv
// add` denies deletes, so a forget could not erase a key; the keyvault
// refuses to start on it, saying so.
func TestJetStreamRefusesABucketThatCannotErase(t *testing.T) {
	nc := startNATS(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: cluster.KeysBucket}); err != nil {
		t.Fatal(err)
	}
	kv := (&storage{store: keyvault.StoreJetStream, url: nc.ConnectedUrl()}).build(t, envelope.NewRandomKey(), nc)
	err = kv.Start(t.Context())
	if err == nil || !strings.Contains(err.Error(), "denies deletes") {
		_ = kv.Stop(context.Background())
		t.Fatalf("start on a bucket made by nats kv add: got %v, want a refusal saying it denies deletes", err)
	}
}

// newKeys creates the keys of user_0 to user_<n-1> in context default.
func newKeys(t *testing.T, kv *keyvault.Service, n int) map[string]vaultclient.KeyReply {
	t.Helper()
	keys := map[string]vaultclient.KeyReply{}
	for i := range n {
		e := fmt.Sprintf("user_%d", i)
		r, err := kv.DataKey(t.Context(), "default", e, true)
		if err != nil {
			t.Fatal(err)
		}
		keys[e] = r
	}
	return keys
}
