package main

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/kuma"
)

// TestMigrateAndStatusCommands: with two shardnodes, `kuma status` shows
// both members and every shard's owner and epoch; `kuma migrate` moves a
// shard and waits for it, says clearly when the wait runs out, refuses bad
// input with the protocol's codes, and --unpin drops the pin.
func TestMigrateAndStatusCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("moves shards between two nodes: seconds")
	}
	first := kumatest.Start(t, func(c *app.Config) { c.NodeName = "n1" })
	second, err := app.New(app.Config{Target: app.ModuleShardnode, NodeName: "n2", DataDir: t.TempDir(),
		Shards: first.Cfg.Shards, NATSURL: first.App.ClientURL(), Logger: first.Cfg.Logger})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := second.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // before first's cleanup: n2 hands its shards back
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := second.Stop(ctx); err != nil {
			t.Errorf("stop n2: %v", err)
		}
	})
	env := map[string]string{"KUMA_NATS_URL": first.App.ClientURL()}

	status := func() kuma.StatusReply {
		t.Helper()
		out, errs, code := runCLI(t, env, "status")
		var st kuma.StatusReply
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("status exit %d: %s %s", code, out, errs)
		}
		return st
	}
	// Wait until both members own what rendezvous hashing gives them.
	var st kuma.StatusReply
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st = status()
		still := len(st.Nodes) == 2 && len(st.Moves) == 0
		for _, s := range st.Shards {
			still = still && s.Owner != "" && s.Owner == s.Desired && s.Moving == ""
		}
		if still {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the two nodes did not settle: %+v", st)
		}
	}
	if st.Nodes[0].Name != "n1" || st.Nodes[1].Name != "n2" || st.Nodes[0].Shards+st.Nodes[1].Shards != 4 || len(st.Shards) != 4 {
		t.Fatalf("status nodes %+v, %d shards", st.Nodes, len(st.Shards))
	}
	for _, s := range st.Shards {
		if s.Epoch < 1 {
			t.Fatalf("shard %d shows epoch %d", s.Shard, s.Epoch)
		}
	}
	// Shard 0 goes to the other node, and back.
	shard, from, epoch := 0, st.Shards[0].Owner, st.Shards[0].Epoch
	to := map[string]string{"n1": "n2", "n2": "n1"}[from]
	S := strconv.Itoa(shard)

	out, errs, code := runCLI(t, env, "migrate", "--shard", S, "--to", to)
	var rep kuma.MigrateReply
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil {
		t.Fatalf("migrate exit %d: %s %s", code, out, errs)
	}
	if rep.Shard != shard || rep.To != to || rep.Owner != to || !rep.Pinned || rep.Epoch <= epoch ||
		!strings.Contains(errs, "moved from "+from+" to "+to+" in ") {
		t.Fatalf("migrate printed %+v and %q; want shard %d on %s above epoch %d", rep, errs, shard, to, epoch)
	}
	st = status()
	if s := st.Shards[shard]; s.Owner != to || s.Epoch != rep.Epoch || s.Pinned != to {
		t.Fatalf("status after the migrate: %+v, want owner %s epoch %d pinned %[2]s", s, to, rep.Epoch)
	}

	// A node keeps a shard it has just taken for a while (MinHold,
	// seconds), so a move straight back cannot finish within this wait.
	out, errs, code = runCLI(t, env, "migrate", "--shard", S, "--to", from, "--wait", "200ms")
	if code != 1 || out != "" || !strings.Contains(errs, "is still on "+to) || !strings.Contains(errs, "the pin stays") {
		t.Fatalf("migrate with a short wait: exit %d stdout %q stderr %q; want exit 1 saying where the shard is", code, out, errs)
	}
	out, errs, code = runCLI(t, env, "migrate", "--shard", S, "--to", from)
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || rep.Owner != from || rep.Epoch <= st.Shards[shard].Epoch {
		t.Fatalf("migrate back: exit %d: %s %s", code, out, errs)
	}

	out, errs, code = runCLI(t, env, "migrate", "--shard", S, "--unpin", "--wait", "0")
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || rep.Pinned || rep.Shard != shard {
		t.Fatalf("unpin: exit %d: %s %s", code, out, errs)
	}
	// The pin is deleted before the answer; status reads pins from a watch.
	for deadline := time.Now().Add(10 * time.Second); status().Shards[shard].Pinned != ""; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("status still shows the pin of shard %d after the unpin", shard)
		}
	}

	// Refusals: protocol errors exit 1 with the error as JSON; usage
	// mistakes exit 2.
	for _, tc := range []struct {
		args []string
		code kuma.Code
	}{
		{[]string{"--shard", "4", "--to", "n2"}, kuma.CodeBadRequest},
		{[]string{"--shard", "0", "--to", "nobody"}, kuma.CodeNotFound},
	} {
		out, errs, code := runCLI(t, env, append([]string{"migrate"}, tc.args...)...)
		var body kuma.ErrorReply
		if code != 1 || out != "" || json.Unmarshal([]byte(errs), &body) != nil || body.Error == nil || body.Error.Code != tc.code {
			t.Fatalf("migrate %v: exit %d stdout %q stderr %q, want exit 1 and %s", tc.args, code, out, errs, tc.code)
		}
	}
	for _, args := range [][]string{{"--to", "n2"}, {"--shard", "1"}, {"--shard", "1", "--to", "n2", "--unpin"}, {"--shard", "1", "--to", "n2", "--wait", "-1s"}, {"1", "n2"}} {
		if _, errs, code := runCLI(t, env, append([]string{"migrate"}, args...)...); code != 2 || errs == "" {
			t.Fatalf("migrate %v: exit %d stderr %q, want exit 2 with a message", args, code, errs)
		}
	}
}
