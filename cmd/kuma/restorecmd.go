package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/services/keyvault"
)

const restoreHelp = `Usage: kuma restore --from BACKUP --data DIR [--master-key-file F] [--tombstones FILE]

Restores a backup offline into DIR, which must be new or empty; then run
kuma up --data DIR with the same master key (the shard count is the
backup's, from DIR). Every checksum and the master key are checked before
anything is written; on any failure DIR is left empty.

Tombstones win: entities forgotten after the backup are forgotten again if
you give the live keyvault's tombstones, exported with
  kuma keyvault tombstones --nats-user ops > FILE
Each destroys that entity's key in the restored keyvault, and its rows are
deleted from the shard files at the first start, before the shard serves.
Without them (the live keyvault is gone too), forget those entities again
yourself.

`

// cmdRestore runs `kuma restore --from DIR --data D`, offline: it checks
// the backup whole (every checksum, the master key) before writing into D,
// which must be empty, and leaves D empty again if anything fails after.
func cmdRestore(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("restore", stderr)
	fs.Usage = func() { fmt.Fprint(stderr, restoreHelp); fs.PrintDefaults() }
	from := fs.String("from", "", "the backup directory (made by kuma backup)")
	dataDir := fs.String("data", "", "the data directory to restore into: new or empty; then run kuma up --data with it")
	keyFile := fs.String("master-key-file", "", "file with the master key the backup was made under (base64); or set KUMA_MASTER_KEY")
	tombs := fs.String("tombstones", "", "file of tombstones exported from the live keyvault after the backup (kuma keyvault tombstones): those entities are forgotten again")
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	switch {
	case len(pos) != 0:
		return usageError{fmt.Errorf("unexpected argument %q; want --from DIR --data DIR", pos[0])}
	case *from == "" || *dataDir == "":
		return usageError{errors.New("--from BACKUP_DIR and --data DATA_DIR are both required")}
	}
	key, err := restoreMasterKey(*keyFile, getenv)
	if err != nil {
		return usageError{err}
	}
	var later []kuma.Tombstone
	if *tombs != "" {
		if later, err = readTombstones(*tombs); err != nil {
			return err
		}
	}
	m, err := checkBackup(*from, key)
	if err != nil {
		return err
	}
	if err := emptyDir(*dataDir); err != nil {
		return usageError{err}
	}
	if err := restoreInto(ctx, *from, *dataDir, m, key, later, stderr); err != nil {
		clearDir(*dataDir)
		return fmt.Errorf("%w; %s was left empty", err, *dataDir)
	}
	start := "kuma up --data " + *dataDir
	if m.Context != kuma.DefaultContext {
		start += " --context " + m.Context
	}
	fmt.Fprintf(stdout, "restored backup %s (context %q, %d shards, taken %s) into %s; start it with: %s and the same master key\n",
		m.ID, m.Context, m.Shards, m.StartedAt.Format(time.RFC3339), *dataDir, start)
	for _, f := range m.Files {
		if f.Path == projectionsFile {
			fmt.Fprintf(stdout, "projection declarations (checked): %s; give it to the nodes with --projections\n", filepath.Join(*from, projectionsFile))
		}
	}
	return nil
}

// restoreMasterKey reads the master key from --master-key-file, else
// KUMA_MASTER_KEY.
func restoreMasterKey(file string, getenv func(string) string) ([]byte, error) {
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		return app.DecodeMasterKey(strings.TrimSpace(string(b)))
	}
	if k := getenv("KUMA_MASTER_KEY"); k != "" {
		return app.DecodeMasterKey(strings.TrimSpace(k))
	}
	return nil, errors.New("the master key the backup was made under is required: --master-key-file FILE or KUMA_MASTER_KEY")
}

// checkBackup reads the manifest and checks every file's size and checksum
// and the master key's fingerprint, touching nothing.
func checkBackup(dir string, key []byte) (*backupManifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil, fmt.Errorf("%s is not a complete backup (no %s; a backup cut short writes none): %w", dir, manifestName, err)
	}
	var m backupManifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, manifestName), err)
	}
	if m.Format != manifestFormat {
		return nil, fmt.Errorf("%s has format %d; this kuma reads format %d", manifestName, m.Format, manifestFormat)
	}
	if err := kuma.ValidateContext(m.Context); err != nil || m.Shards < 1 {
		return nil, fmt.Errorf("%s names context %q with %d shards: damaged", manifestName, m.Context, m.Shards)
	}
	if got := keyvault.MasterKeyFingerprint(key); got != m.MasterKeyFingerprint {
		return nil, fmt.Errorf("this backup was made under another master key (fingerprint %s, the key given has %s): give the master key of the cluster it was taken from",
			m.MasterKeyFingerprint, got)
	}
	want := map[string]bool{keyvaultFile: true}
	for n := range m.Shards {
		want[shardFile(m.Context, n)] = true
	}
	for _, f := range m.Files {
		rel := filepath.FromSlash(f.Path)
		if !want[rel] && rel != projectionsFile {
			return nil, fmt.Errorf("%s lists %q, which is not a file of a backup of %q with %d shards: damaged", manifestName, f.Path, m.Context, m.Shards)
		}
		delete(want, rel)
		sum, n, err := fileSHA256(filepath.Join(dir, rel))
		if err != nil {
			return nil, fmt.Errorf("backup file %s: %w", f.Path, err)
		}
		if n != f.Bytes || sum != f.SHA256 {
			return nil, fmt.Errorf("backup file %s is damaged: sha256 %s (%d bytes), the manifest says %s (%d bytes); nothing was restored",
				f.Path, sum, n, f.SHA256, f.Bytes)
		}
	}
	for rel := range want {
		return nil, fmt.Errorf("the backup lacks %s: incomplete", rel)
	}
	return &m, nil
}

// restoreInto copies a checked backup into the empty data directory and
// readies it for `kuma up`.
func restoreInto(ctx context.Context, from, data string, m *backupManifest, key []byte, later []kuma.Tombstone, stderr io.Writer) error {
	for _, f := range m.Files {
		rel := filepath.FromSlash(f.Path)
		if rel == projectionsFile {
			continue // the nodes read it from --projections
		}
		if err := copyPrivate(filepath.Join(from, rel), filepath.Join(data, rel)); err != nil {
			return err
		}
	}
	kv, err := keyvault.RestoreFile(ctx, filepath.Join(data, keyvaultFile), key, later)
	if err != nil {
		return err
	}
	if len(later) > 0 {
		fmt.Fprintf(stderr, "keyvault: %d of %d tombstones were new since the backup; %d data keys destroyed\n", kv.Applied, len(later), kv.Keys)
	}
	for n := range m.Shards {
		path := filepath.Join(data, shardFile(m.Context, n))
		info, err := sqlite.PrepareRestored(ctx, path, m.Context, n, m.Shards, func(entity string) (time.Time, bool) {
			return kv.Forgotten(m.Context, entity)
		})
		if err != nil {
			return fmt.Errorf("backup file %s: %w", filepath.ToSlash(shardFile(m.Context, n)), err)
		}
		if info.Forgotten > 0 {
			fmt.Fprintf(stderr, "shard %d: %d forgotten entities marked; kuma up deletes their rows before serving\n", n, info.Forgotten)
		}
	}
	meta := struct {
		Context   string    `json:"context"`
		Shards    int       `json:"shards"`
		CreatedAt time.Time `json:"created_at"`
	}{m.Context, m.Shards, time.Now().UTC()}
	b, _ := json.MarshalIndent(meta, "", "  ")
	return os.WriteFile(filepath.Join(data, m.Context, "context.json"), append(b, '\n'), sqlite.PrivateFileMode)
}

// clearDir removes everything inside dir, leaving dir.
func clearDir(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		_ = os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

// readTombstones reads a file of `kuma keyvault tombstones`: one JSON
// tombstone a line.
func readTombstones(path string) ([]kuma.Tombstone, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []kuma.Tombstone
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var t kuma.Tombstone
		if err := json.Unmarshal(sc.Bytes(), &t); err != nil || t.Pseudonym == "" {
			return nil, fmt.Errorf("%s line %d is not a tombstone of kuma keyvault tombstones", path, line)
		}
		out = append(out, t)
	}
	return out, sc.Err()
}

// cmdTombstones runs `kuma keyvault tombstones`: every forgotten id of the
// live keyvault, by pseudonym, as JSON lines on stdout.
func cmdTombstones(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("keyvault tombstones", stderr)
	conn := connectFlags(fs, "give up on a page after this long")
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	if len(pos) != 0 {
		return usageError{errors.New("usage: kuma keyvault tombstones > FILE")}
	}
	c, closeConn, err := conn.client()
	if err != nil {
		return err
	}
	defer closeConn()
	w := bufio.NewWriter(stdout)
	enc := json.NewEncoder(w)
	for after := ""; ; {
		rctx, cancel := context.WithTimeout(ctx, *conn.timeout)
		page, err := c.Tombstones(rctx, after, kuma.MaxTombstonesPage)
		cancel()
		if err != nil {
			return err
		}
		for _, t := range page.Tombstones {
			if err := enc.Encode(t); err != nil {
				return err
			}
		}
		if page.Next == "" {
			return w.Flush()
		}
		after = page.Next
	}
}
