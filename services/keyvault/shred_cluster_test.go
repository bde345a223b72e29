//go:build cluster

package keyvault_test

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/vaultclient"
	"github.com/kumadb/kuma/services/keyvault"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// walCompactionBound is how long the test waits for every copy to go: a
// replicated stream snapshots, and so compacts its Raft log, every
// compactInterval (2 minutes) plus a jitter of up to a minute fixed when
// the stream starts (nats-server v2.15.2, jetstream_cluster.go,
// monitorStream), with a minute of slack for a slow machine.
const walCompactionBound = 4 * time.Minute

// TestShredLeavesNoCopyOnAnyReplica is the proof that a forget is real in
// a cluster: three nats-servers on loopback, the key bucket at R3, keys of
// fifty entities, one forgotten; then every file of every server's store
// directory is read as raw bytes, until none holds the forgotten entity's
// wrapped key (the message's bytes) or its data key (raw or base64). It
// logs where each copy was found and when it went. The stream's own block
// files are clean at once (secure delete overwrites the message); the Raft
// log of each replica keeps the proposal that wrote the key until that
// replica's next stream snapshot compacts it, which nothing a client can do
// brings forward (see docs/cluster.md).
func TestShredLeavesNoCopyOnAnyReplica(t *testing.T) {
	t.Run("quiet", func(t *testing.T) { shredProof(t, false) })
	// Keys keep being created while the copies are looked for, so the Raft
	// log is rarely fully applied when a snapshot compacts it: compaction
	// then cuts the log short of its last block instead of removing it all.
	t.Run("busy", func(t *testing.T) { shredProof(t, true) })
}

func shredProof(t *testing.T, busy bool) {
	var servers []*server.Server
	var dirs []string
	for i := range 3 {
		dir := t.TempDir()
		cfg := natsbus.ServerConfig{Listen: "127.0.0.1:-1", ServerName: fmt.Sprintf("n%d", i+1), ClusterListen: "127.0.0.1:-1", StoreDir: dir}
		if i > 0 {
			cfg.Routes = []string{"nats://" + servers[0].ClusterAddr().String()}
		}
		srv, err := natsbus.StartServer(t.Context(), cfg)
		if err != nil {
			t.Fatalf("start n%d: %v", i+1, err)
		}
		t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
		servers = append(servers, srv)
		dirs = append(dirs, dir)
	}
	master := envelope.NewRandomKey()
	var vaults []*keyvault.Service
	var conns []*nats.Conn
	for _, srv := range servers {
		nc, err := nats.Connect(srv.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		if err := natsbus.WaitJetStream(t.Context(), nc); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, nc)
		st := &storage{store: keyvault.StoreJetStream, url: srv.ClientURL()}
		vaults = append(vaults, st.start(t, master, nc))
	}
	js, err := jetstream.New(conns[0])
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(t.Context(), "KV_"+cluster.KeysBucket)
	if err != nil {
		t.Fatal(err)
	}
	if r := stream.CachedInfo().Config.Replicas; r != 3 {
		t.Fatalf("bucket replicas: got %d, want 3 on a cluster of three", r)
	}

	// Keys created through all three instances; the victim's in the middle.
	var victim vaultclient.KeyReply
	for i := range 50 {
		r, err := vaults[i%3].DataKey(t.Context(), "default", fmt.Sprintf("user_%d", i), true)
		if err != nil {
			t.Fatal(err)
		}
		if i == 25 {
			victim = r
		}
	}
	msg, err := stream.GetLastMsgForSubject(t.Context(), "$KV."+cluster.KeysBucket+".k.default."+victim.Pseudonym)
	if err != nil {
		t.Fatalf("the victim's key message: %v", err)
	}
	needles := map[string][]byte{
		"wrapped key":          msg.Data,
		"data key":             victim.Key,
		"data key (base64)":    []byte(base64.StdEncoding.EncodeToString(victim.Key)),
		"wrapped key's middle": msg.Data[len(msg.Data)/2-12 : len(msg.Data)/2+12],
	}
	find := func() []string {
		var found []string
		for i, dir := range dirs {
			_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return nil // a file removed under the walk is gone, which is fine
				}
				b, err := os.ReadFile(path)
				if err != nil {
					return nil
				}
				for name, n := range needles {
					if bytes.Contains(b, n) {
						rel, _ := filepath.Rel(dir, path)
						found = append(found, fmt.Sprintf("n%d: %s in %s", i+1, name, rel))
					}
				}
				return nil
			})
		}
		sort.Strings(found)
		return found
	}
	// The search must see the key before the forget, on every server, or
	// its silence afterwards would prove nothing.
	deadline := time.Now().Add(10 * time.Second)
	for {
		before := strings.Join(find(), "\n")
		if strings.Contains(before, "n1: wrapped key in") && strings.Contains(before, "n2: wrapped key in") && strings.Contains(before, "n3: wrapped key in") {
			t.Logf("before the forget:\n%s", before)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("before the forget the wrapped key is not on every server's disk; the search is broken:\n%s", before)
		}
		time.Sleep(200 * time.Millisecond)
	}

	if busy {
		done := make(chan struct{})
		stopped := make(chan struct{})
		go func() {
			defer close(stopped)
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				case <-time.After(20 * time.Millisecond):
				}
				_, _ = vaults[i%3].DataKey(t.Context(), "default", fmt.Sprintf("busy_%d", i), true)
			}
		}()
		defer func() { close(done); <-stopped }()
	}
	start := time.Now()
	if _, err := vaults[1].Shred(t.Context(), vaultclient.ShredRequest{Context: "default", Entity: "user_25", Reason: "proof"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("forget acknowledged in %v", time.Since(start).Round(time.Millisecond))
	last := ""
	for {
		found := find()
		now := strings.Join(found, "\n")
		if now != last {
			t.Logf("%v after the forget: %d copies\n%s", time.Since(start).Round(time.Second), len(found), now)
			last = now
		}
		if len(found) == 0 {
			break
		}
		if time.Since(start) > walCompactionBound {
			t.Fatalf("%v after the forget, copies of the forgotten entity's key remain:\n%s", walCompactionBound, now)
		}
		time.Sleep(time.Second)
	}
	t.Logf("no copy of the forgotten key on any of the three servers' disks %v after the forget", time.Since(start).Round(time.Second))
	// The other entities' keys are intact, on every instance.
	for i, kv := range vaults {
		if _, err := kv.DataKey(t.Context(), "default", "user_24", false); err != nil {
			t.Errorf("instance %d: user_24 after the forget: %v", i+1, err)
		}
	}
}
