package main

import (
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// filesNotPrivate lists what under dir another user could read or list:
// shard files hold ids and times in clear, read models hold event data.
func filesNotPrivate(t *testing.T, dir string) []string {
	t.Helper()
	var wide []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if info.Mode().Perm()&0o077 != 0 {
			rel, _ := filepath.Rel(dir, path)
			wide = append(wide, rel+" "+info.Mode().Perm().String())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return wide
}

// TestDataFilesArePrivate runs `kuma up` with a projection under the usual
// umask 022, writes, and finds every file of the data directory 0600 and
// every folder 0700: shard files with their -wal and -shm, read models,
// context.json, the keyvault. Then it widens them as an older Kuma left
// them, restarts, and finds them narrowed again.
func TestDataFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := filepath.Join(t.TempDir(), "data")
	file := filepath.Join(t.TempDir(), "projections.yaml")
	if err := os.WriteFile(file, []byte(countingYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	n := &crashNode{t: t, dir: dir, port: port}
	written := 0
	write := func() {
		t.Helper()
		n.p = spawn(t, []string{"up", "--data", dir, "--nats-listen", "127.0.0.1:" + strconv.Itoa(port), "--shards", "2",
			"--metrics-listen", "127.0.0.1:0", "--console-listen", ""}, "KUMA_PROJECTIONS="+file)
		n.p.waitReady(t, 60*time.Second)
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		c, err := client.New(connect(t, n.url()), client.Options{Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range []string{"acct-1", "acct-2", "acct-3"} {
			if _, err := c.Append(ctx, e, []kuma.EventInput{{Type: "Deposited", Data: json.RawMessage(`{"amount":5}`)}}); err != nil {
				t.Fatal(err)
			}
			written++
		}
		// Wait for the read model to hold them, so its file is written.
		for {
			rep, err := c.Query(ctx, "counts", &kuma.QueryRequest{Query: "totals"})
			if err == nil && len(rep.Rows) == 1 && rep.Rows[0]["events"] == float64(written) {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("the projection did not catch up: %v %+v", err, rep)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	write()
	var dbs []string
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && (strings.HasSuffix(path, ".db") || strings.HasSuffix(path, "-wal")) {
			dbs = append(dbs, path)
		}
		return nil
	})
	for _, want := range []string{"shard-000.db-wal", "counts.", "catalog.db", "keys.db"} {
		if !strings.Contains(strings.Join(dbs, " "), want) {
			t.Fatalf("no %s among the files kuma up wrote: %v", want, dbs)
		}
	}
	if wide := filesNotPrivate(t, dir); len(wide) > 0 {
		t.Fatalf("readable by others after kuma up wrote:\n%s", strings.Join(wide, "\n"))
	}

	// As an older Kuma left them: files 0644, folders 0755.
	n.term()
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || strings.Contains(path, string(filepath.Separator)+"nats") {
			return err
		}
		if d.IsDir() {
			return os.Chmod(path, 0o755)
		}
		return os.Chmod(path, 0o644)
	})
	write()
	for _, wide := range filesNotPrivate(t, dir) {
		// The data folder itself is the operator's: not narrowed.
		if !strings.HasPrefix(wide, ". ") {
			t.Errorf("still readable by others after a restart: %s", wide)
		}
	}
}
