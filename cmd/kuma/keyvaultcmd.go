package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/services/keyvault"
)

// cmdKeyvault runs keyvault maintenance: `kuma keyvault rotate` (offline)
// and `kuma keyvault tombstones` (against a running keyvault).
func cmdKeyvault(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) > 0 && args[0] == "tombstones" {
		return cmdTombstones(ctx, args[1:], stdout, stderr, getenv)
	}
	if len(args) == 0 || args[0] != "rotate" {
		return usageError{errors.New("usage: kuma keyvault rotate --data DIR --master-key-file OLD --new-master-key-file NEW, or kuma keyvault tombstones > FILE")}
	}
	fs := newFlagSet("keyvault rotate", stderr)
	dataDir := fs.String("data", app.DefaultDataDir, "data directory")
	oldFile := fs.String("master-key-file", "", "file with the current master key (base64)")
	newFile := fs.String("new-master-key-file", "", "file with the new master key (base64)")
	if _, err := parse(fs, args[1:], getenv); err != nil {
		return helpOK(err)
	}
	if *oldFile == "" || *newFile == "" {
		return usageError{errors.New("--master-key-file and --new-master-key-file are both required")}
	}
	read := func(path string) ([]byte, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		return app.DecodeMasterKey(string(bytes.TrimSpace(b)))
	}
	oldKey, err := read(*oldFile)
	if err != nil {
		return err
	}
	newKey, err := read(*newFile)
	if err != nil {
		return err
	}
	path := filepath.Join(*dataDir, "keyvault", "keys.db")
	n, err := keyvault.Rotate(ctx, path, oldKey, newKey)
	if err != nil {
		return fmt.Errorf("rotate %s: %w", path, err)
	}
	fmt.Fprintf(stdout, "re-wrapped %d data keys in %s under the new master key; start Kuma with --master-key-file %s\n", n, path, *newFile)
	return nil
}
