package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/natsbus"
)

// TestJoinFlagTakesListsFromFlagsAndEnvironment: --join repeats and splits
// on commas, KUMA_JOIN is a comma-separated list, and flags win over it.
func TestJoinFlagTakesListsFromFlagsAndEnvironment(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want []string
	}{
		{"repeated and comma-separated", []string{"--join", "nats://a:6222,nats://b:6222", "--join", "nats://c:6222"}, nil,
			[]string{"nats://a:6222", "nats://b:6222", "nats://c:6222"}},
		{"environment", nil, map[string]string{"KUMA_JOIN": "nats://a:6222, nats://b:6222,"},
			[]string{"nats://a:6222", "nats://b:6222"}},
		{"flag over environment", []string{"--join", "nats://c:6222"}, map[string]string{"KUMA_JOIN": "nats://a:6222"},
			[]string{"nats://c:6222"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := newFlagSet("up", io.Discard)
			var nc natsbus.ServerConfig
			nc.RegisterFlags(fs)
			if _, err := parse(fs, tc.args, func(k string) string { return tc.env[k] }); err != nil {
				t.Fatal(err)
			}
			if got := nc.Routes; !slices.Equal(got, tc.want) {
				t.Errorf("join: got %q, want %q", got, tc.want)
			}
		})
	}
}

// TestUpRefusesBadClusterFlags: kuma up checks the cluster flags before it
// starts anything: usage error (exit 2), the fix in the message, no data dir.
func TestUpRefusesBadClusterFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"join without a cluster listener", []string{"--join", "nats://10.0.0.1:6222"}, nil, "--join needs --cluster-listen"},
		{"join from the environment", nil, map[string]string{"KUMA_JOIN": "nats://10.0.0.1:6222"}, "--join needs --cluster-listen"},
		{"cluster listener on the network", []string{"--cluster-listen", "0.0.0.0:6222"}, nil, "--cluster-listen 0.0.0.0:6222 is not a loopback address"},
		{"unknown keyvault", []string{"--keyvault", "nearby"}, nil, "--keyvault must be local"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			_, stderr, code := runCLI(t, tc.env, append([]string{"up", "--data", dir, "--metrics-listen", "", "--console-listen", ""}, tc.args...)...)
			if code != 2 || !strings.Contains(stderr, tc.want) {
				t.Errorf("kuma up %q: got exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("data dir after a refused start: stat %v, want not exist", err)
			}
		})
	}
}
