package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/nats-io/nats.go/jetstream"
)

// manifestName is the file of a backup that lists the others.
const manifestName = "manifest.json"

// manifestFormat is the version of manifest.json's layout.
const manifestFormat = 1

// backupManifest describes a backup directory: restore checks every file
// against it before it writes anything.
type backupManifest struct {
	Format  int    `json:"format"`
	ID      string `json:"id"`
	Context string `json:"context"`
	Shards  int    `json:"shards"`
	// StartedAt is the backup point: every event acknowledged before it is
	// in the shard files (each copy was made after it).
	StartedAt  time.Time `json:"started_at"`
	FinishedAt time.Time `json:"finished_at"`
	// MasterKeyFingerprint names the master key the keyvault's keys are
	// wrapped under (keyvault.MasterKeyFingerprint); the key is not here.
	MasterKeyFingerprint string         `json:"master_key_fingerprint"`
	KumaVersion          string         `json:"kuma_version"`
	Files                []manifestFile `json:"files"`
}

// manifestFile is one file of a backup, by its path relative to the
// backup directory (the same as in a data directory).
type manifestFile struct {
	Path   string `json:"path"`
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"`
	// Shard is set for a shard file, with its last position and the
	// position the stream held when it was copied.
	Shard     *int  `json:"shard,omitempty"`
	LastSeq   int64 `json:"last_seq,omitempty"`
	Published int64 `json:"published,omitempty"`
}

const backupHelp = `Usage: kuma backup DIR [flags]

Copies the context's shard files and the keyvault into DIR (new or empty),
online: each shard's owner and the keyvault make a consistent copy, which
travels through the object store KUMA_BACKUPS and is erased there once
downloaded. DIR/manifest.json lists every file with its sha256 and the
master key's fingerprint. The master key is never in the backup: keep it
apart. Read models are not copied; they are rebuilt from the stream.
Needs the NATS user ops (deployments/nats/kuma.conf).

`

// keyvaultFile is the keyvault's path in a data directory and in a backup.
var keyvaultFile = filepath.Join("keyvault", "keys.db")

// projectionsFile is the copy of the projection declarations in a backup
// (kuma backup --projections); restore checks it and leaves it there: the
// nodes read it from wherever --projections names.
const projectionsFile = "projections.yaml"

func shardFile(kctx string, n int) string {
	return filepath.Join(kctx, fmt.Sprintf("shard-%03d.db", n))
}

// cmdBackup runs `kuma backup DIR`: every shard's owner copies its file
// (online, one read snapshot each), then the keyvault copies its own, each
// through the KUMA_BACKUPS object store, downloaded here, checked and erased
// there. The keyvault goes last: every event in the shard copies then has
// its key in the keyvault's copy, or its id is forgotten there.
func cmdBackup(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("backup", stderr)
	fs.Usage = func() { fmt.Fprint(stderr, backupHelp); fs.PrintDefaults() }
	conn := connectFlagsTimeout(fs, "give up on one file's copy (made, uploaded, downloaded) after this long", 5*time.Minute)
	projections := fs.String("projections", "", "the projections YAML file the nodes run with (kuma up --projections): copied into the backup, checked like the rest")
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	if len(pos) != 1 {
		return usageError{errors.New("usage: kuma backup DIR (a new or empty directory)")}
	}
	dir := pos[0]
	if *projections != "" {
		if _, err := os.Stat(*projections); err != nil {
			return usageError{fmt.Errorf("--projections: %w", err)}
		}
	}
	if err := emptyDir(dir); err != nil {
		return usageError{err}
	}
	nc, c, err := conn.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	m := backupManifest{Format: manifestFormat, ID: newBackupID(), Context: *conn.ctxName,
		StartedAt: time.Now().UTC(), KumaVersion: version}
	rctx, cancel := context.WithTimeout(ctx, min(*conn.timeout, 30*time.Second))
	st, err := c.Status(rctx)
	cancel()
	if err != nil {
		return fmt.Errorf("read the shard count from status: %w", err)
	}
	m.Shards = len(st.Shards)
	if m.Shards == 0 {
		return fmt.Errorf("status of context %q lists no shards; is it served?", m.Context)
	}
	var written []string
	// A backup cut short removes what it wrote here and erases what the
	// nodes uploaded for it (an upload answered after this gave up too, if
	// it is there by then).
	fail := func(err error) error {
		for _, p := range written {
			_ = os.Remove(filepath.Join(dir, p))
		}
		ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if _, eerr := cluster.EraseBackups(ectx, js, m.ID+"/"); eerr != nil {
			fmt.Fprintf(stderr, "could not erase this backup's uploads from %s: %v\n", cluster.BackupsBucket, eerr)
		}
		return err
	}
	fetch := func(rep *kuma.BackupReply, rel string) (manifestFile, error) {
		dst := filepath.Join(dir, rel)
		if err := sqlite.PrepareDir(filepath.Dir(dst)); err != nil {
			_ = cluster.EraseBackup(ctx, js, rep.Object)
			return manifestFile{}, err
		}
		written = append(written, rel)
		dctx, cancel := context.WithTimeout(ctx, *conn.timeout)
		defer cancel()
		if err := cluster.GetBackup(dctx, js, rep.Object, dst); err != nil {
			_ = cluster.EraseBackup(ctx, js, rep.Object)
			return manifestFile{}, err
		}
		sum, n, err := fileSHA256(dst)
		if err != nil {
			return manifestFile{}, err
		}
		if sum != rep.SHA256 || n != rep.Bytes {
			return manifestFile{}, fmt.Errorf("%s arrived with %d bytes and sha256 %s, not the %d bytes and %s uploaded; run the backup again",
				rel, n, sum, rep.Bytes, rep.SHA256)
		}
		return manifestFile{Path: filepath.ToSlash(rel), Bytes: n, SHA256: sum}, nil
	}
	for n := range m.Shards {
		rctx, cancel := context.WithTimeout(ctx, *conn.timeout)
		rep, err := c.BackupShard(rctx, n, m.ID)
		cancel()
		if err != nil {
			return fail(fmt.Errorf("shard %d: %w", n, err))
		}
		f, err := fetch(rep, shardFile(m.Context, n))
		if err != nil {
			return fail(fmt.Errorf("shard %d: %w", n, err))
		}
		f.Shard, f.LastSeq, f.Published = &n, rep.LastSeq, rep.Published
		m.Files = append(m.Files, f)
		fmt.Fprintf(stderr, "shard %d: %d bytes, last position %d\n", n, f.Bytes, f.LastSeq)
	}
	if *projections != "" {
		if err := copyPrivate(*projections, filepath.Join(dir, projectionsFile)); err != nil {
			return fail(fmt.Errorf("--projections: %w", err))
		}
		written = append(written, projectionsFile)
		sum, n, err := fileSHA256(filepath.Join(dir, projectionsFile))
		if err != nil {
			return fail(err)
		}
		m.Files = append(m.Files, manifestFile{Path: projectionsFile, Bytes: n, SHA256: sum})
	}
	rctx, cancel = context.WithTimeout(ctx, *conn.timeout)
	rep, err := c.BackupKeyvault(rctx, m.ID)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("keyvault: %w", err))
	}
	f, err := fetch(rep, keyvaultFile)
	if err != nil {
		return fail(fmt.Errorf("keyvault: %w", err))
	}
	m.Files = append(m.Files, f)
	m.MasterKeyFingerprint = rep.MasterKeyFingerprint
	m.FinishedAt = time.Now().UTC()
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, manifestName), append(b, '\n'), sqlite.PrivateFileMode); err != nil {
		return fail(err)
	}
	fmt.Fprintf(stdout, "backup %s of context %q: %d shards and the keyvault in %s (the master key is not in it: keep it apart)\n",
		m.ID, m.Context, m.Shards, dir)
	return nil
}

// emptyDir creates dir (0700) if it does not exist and refuses one that
// holds anything.
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return sqlite.PrepareDir(dir)
	}
	if err != nil {
		return err
	}
	if len(entries) > 0 {
		return fmt.Errorf("%s is not empty; give a new or empty directory", dir)
	}
	return nil
}

// newBackupID names a backup: its UTC time and a random suffix.
func newBackupID() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return time.Now().UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b[:])
}

func fileSHA256(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// copyPrivate copies a file into a private folder as a private file,
// synced.
func copyPrivate(src, dst string) error {
	if err := sqlite.PrepareDir(filepath.Dir(dst)); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, sqlite.PrivateFileMode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
