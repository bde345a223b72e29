// Package feedc holds a feed consumer written in C (c/follow.c); its test
// builds it with the system's C compiler against libnats and cJSON and runs
// it against a real Kuma node, so the feed is proven usable from a second
// language with nothing but PROTOCOL.md.
package feedc

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// buildFollow compiles c/follow.c; it skips, saying what to install, where
// the compiler or the libraries are missing (.ci/run installs them).
func buildFollow(t *testing.T) string {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler (cc) on this machine")
	}
	for _, h := range []string{"/usr/include/nats/nats.h", "/usr/include/cjson/cJSON.h"} {
		if _, err := os.Stat(h); err != nil {
			t.Skipf("%s is missing: apt-get install libnats-dev libcjson-dev", h)
		}
	}
	bin := filepath.Join(t.TempDir(), "follow")
	out, err := exec.Command(cc, "-Wall", "-Wextra", "-Werror", "-o", bin, filepath.Join("c", "follow.c"), "-lnats", "-lcjson").CombinedOutput()
	if err != nil {
		t.Fatalf("cc follow.c: %v\n%s", err, out)
	}
	return bin
}

func TestCFollowerCatchesUpAndResumes(t *testing.T) {
	bin := buildFollow(t)
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	appendN := func(from, to int) {
		for i := from; i < to; i++ {
			id := fmt.Sprintf("c-%d", i%3)
			if _, err := c.Append(t.Context(), id, []kuma.EventInput{{Type: "Noted", Data: json.RawMessage(fmt.Sprintf(`{"i":%d,"text":"caf\u00e9"}`, i))}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	cursor := filepath.Join(t.TempDir(), "cursor")
	run := func() []string {
		cmd := exec.Command(bin, n.App.ClientURL(), "default", cursor)
		cmd.Env = append(os.Environ(), "KUMA_FOLLOW_UNTIL_IDLE=1")
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("follow: %v\n%s", err, out)
		}
		return strings.Split(strings.TrimSpace(string(out)), "\n")
	}
	appendN(0, 250)
	lines := run()
	if len(lines) != 250 {
		t.Fatalf("the C follower printed %d events, want 250:\n%s", len(lines), strings.Join(lines[:min(5, len(lines))], "\n"))
	}
	perEntity := map[string]int{}
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) != 5 || f[3] != "Noted" || !strings.Contains(f[4], `"text":"café"`) {
			t.Fatalf("line %q", l)
		}
		perEntity[f[1]]++
		if want := fmt.Sprintf("v%d", perEntity[f[1]]); f[2] != want {
			t.Fatalf("%s: %s, want %s (version order)", f[1], f[2], want)
		}
	}
	// Resumed from its cursor file: only the new events.
	appendN(250, 260)
	if lines := run(); len(lines) != 10 {
		t.Fatalf("after resuming, %d events, want 10: %q", len(lines), lines)
	}
}
