package main

import (
	"strings"
	"testing"
)

// TestServeNATSTakesClusterFlags: kuma serve --target nats takes kuma up's
// cluster flags (and their KUMA_* variables) and checks them the same way;
// other targets refuse them.
func TestServeNATSTakesClusterFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"non-loopback routes need --insecure", nil,
			[]string{"serve", "--target", "nats", "--cluster-listen", "0.0.0.0:6222"}, "--cluster-listen 0.0.0.0:6222 is not a loopback address"},
		{"--join needs --cluster-listen", map[string]string{"KUMA_JOIN": "nats://a:6222,nats://b:6222"},
			[]string{"serve", "--target", "nats"}, "--join needs --cluster-listen"},
		{"a service joins through --nats-url", nil,
			[]string{"serve", "--target", "router", "--join", "nats://a:6222", "--cluster-listen", "127.0.0.1:6222"}, "kuma serve --target nats"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := runCLI(t, tc.env, append(tc.args, "--data", t.TempDir())...)
			if code != 2 || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want 2 with %q", code, stderr, tc.want)
			}
		})
	}
}
