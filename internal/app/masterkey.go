package app

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// masterKey resolves the keyvault's master key: the config's bytes, else its
// file, else (target all only) a key generated into the data dir on first
// start, with a warning, because a key beside the data it protects protects
// nothing against someone who copies the disk.
func (a *App) masterKey() ([]byte, error) {
	cfg := a.cfg
	if len(cfg.MasterKey) > 0 {
		return cfg.MasterKey, nil
	}
	if cfg.MasterKeyFile != "" {
		return readMasterKeyFile(cfg.MasterKeyFile)
	}
	if cfg.Target != TargetAll {
		return nil, errors.New("keyvault: no master key: give --master-key-file or KUMA_MASTER_KEY (base64 of 32 random bytes, e.g. `head -c 32 /dev/urandom | base64`)")
	}
	path := filepath.Join(cfg.DataDir, "keyvault", "master.key")
	if _, err := os.Stat(path); err == nil {
		if err := sqlite.MakePrivate(path); err != nil {
			return nil, err
		}
		cfg.Logger.Warn("using the master key stored in the data dir; for production keep it elsewhere and pass --master-key-file or KUMA_MASTER_KEY", "file", path)
		return readMasterKeyFile(path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	key := envelope.NewRandomKey()
	enc := base64.StdEncoding.EncodeToString(key) + "\n"
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, fmt.Errorf("keyvault: create %s: %w", path, err)
	}
	if _, err := f.WriteString(enc); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	cfg.Logger.Warn("generated a master key in the data dir: fine for trying Kuma, not for production. "+
		"Move it out of the data dir (a secret manager, a mounted secret) and start with --master-key-file FILE or KUMA_MASTER_KEY",
		"file", path)
	return key, nil
}

func readMasterKeyFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("keyvault: read master key: %w", err)
	}
	return DecodeMasterKey(string(bytes.TrimSpace(b)))
}

// DecodeMasterKey decodes a base64 master key and checks its size.
func DecodeMasterKey(s string) ([]byte, error) {
	key, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("keyvault: the master key is not base64: %w", err)
	}
	if len(key) != envelope.KeySize {
		return nil, fmt.Errorf("keyvault: the master key must be 32 bytes (base64 of 32 random bytes), got %d", len(key))
	}
	return key, nil
}
