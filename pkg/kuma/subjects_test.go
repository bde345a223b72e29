package kuma_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

func TestEntitySubject(t *testing.T) {
	tests := []struct {
		ctx, op, entity string
		want            string
	}{
		{"default", kuma.OpAppend, "user_0x9A4F", "kuma.default.append.user_0x9A4F"},
		{"payments", kuma.OpRead, "order:7731", "kuma.payments.read.order:7731"},
		{"a", kuma.OpHistory, "x", "kuma.a.history.x"},
		{"a-b_c", kuma.OpExport, "k=v@h-1", "kuma.a-b_c.export.k=v@h-1"},
		{"0", kuma.OpForget, "Z", "kuma.0.forget.Z"},
	}
	for _, tc := range tests {
		if got := kuma.EntitySubject(tc.ctx, tc.op, tc.entity); got != tc.want {
			t.Errorf("EntitySubject(%q, %q, %q): got %q, want %q", tc.ctx, tc.op, tc.entity, got, tc.want)
		}
	}
}

func TestShardSubject(t *testing.T) {
	tests := []struct {
		ctx    string
		shard  int
		op     string
		entity string
		want   string
	}{
		{"default", 0, kuma.OpAppend, "user_1", "_kuma.default.shard.0.append.user_1"},
		{"payments", 15, kuma.OpRead, "order:7731", "_kuma.payments.shard.15.read.order:7731"},
		{"a", 1023, kuma.OpForget, "x", "_kuma.a.shard.1023.forget.x"},
	}
	for _, tc := range tests {
		if got := kuma.ShardSubject(tc.ctx, tc.shard, tc.op, tc.entity); got != tc.want {
			t.Errorf("ShardSubject(%q, %d, %q, %q): got %q, want %q", tc.ctx, tc.shard, tc.op, tc.entity, got, tc.want)
		}
		prefix := kuma.ShardPrefix(tc.ctx, tc.shard)
		if !strings.HasPrefix(tc.want, prefix) || !strings.HasSuffix(prefix, ".") {
			t.Errorf("ShardPrefix(%q, %d): got %q, want a dot-terminated prefix of %q", tc.ctx, tc.shard, prefix, tc.want)
		}
	}
}

func TestSubjectPrefixes(t *testing.T) {
	if kuma.PublicPrefix != "kuma" {
		t.Errorf("got PublicPrefix %q, want %q", kuma.PublicPrefix, "kuma")
	}
	// Internal subjects must stay outside kuma.> so that permissions on
	// kuma.<ctx>.> never reach them.
	sub := kuma.ShardSubject("default", 1, kuma.OpAppend, "e")
	if strings.HasPrefix(sub, kuma.PublicPrefix+".") {
		t.Errorf("got shard subject %q, want it outside %s.>", sub, kuma.PublicPrefix)
	}
	want := []string{"append", "read", "history", "export", "forget"}
	if !slices.Equal(kuma.EntityOps, want) {
		t.Errorf("got EntityOps %v, want %v", kuma.EntityOps, want)
	}
}

// roundTripNames are valid names of every shape the rules allow.
var roundTripNames = []struct{ ctx, entity string }{
	{"default", "user_0x9A4F"},
	{"payments", "order:7731"},
	{"a", "b"},
	{"0", "0"},
	{"a-b_c", "k=v@h-1_:"},
	{strings.Repeat("c", 32), strings.Repeat("E", 128)},
}

func TestEntitySubjectRoundTrip(t *testing.T) {
	for _, n := range roundTripNames {
		for _, op := range kuma.EntityOps {
			sub := kuma.EntitySubject(n.ctx, op, n.entity)
			ctx, gotOp, entity, ok := kuma.ParseEntitySubject(sub)
			if !ok || ctx != n.ctx || gotOp != op || entity != n.entity {
				t.Errorf("ParseEntitySubject(%q): got (%q, %q, %q, %v), want (%q, %q, %q, true)",
					sub, ctx, gotOp, entity, ok, n.ctx, op, n.entity)
			}
		}
	}
}

func TestShardSubjectRoundTrip(t *testing.T) {
	for _, n := range roundTripNames {
		for _, shard := range []int{0, 1, 7, 1023} {
			for _, op := range kuma.EntityOps {
				sub := kuma.ShardSubject(n.ctx, shard, op, n.entity)
				gotOp, entity, ok := kuma.ParseShardSubject(sub)
				if !ok || gotOp != op || entity != n.entity {
					t.Errorf("ParseShardSubject(%q): got (%q, %q, %v), want (%q, %q, true)", sub, gotOp, entity, ok, op, n.entity)
				}
			}
		}
	}
}

func TestParseEntitySubjectRejects(t *testing.T) {
	for _, sub := range []string{
		"",
		"kuma",
		"kuma.default",
		"kuma.default.append",
		"kuma.default.append.a.b",           // an entity id with a dot
		"kuma.default.projection.rebuild.x", // five tokens
		"kuma.default.events.3.x",
		"nats.default.append.x",
		"KUMA.default.append.x",
		"_kuma.default.append.x",
		"_kuma.default.shard.0.append.x",
		"kuma.default.append.x.",
	} {
		if ctx, op, entity, ok := kuma.ParseEntitySubject(sub); ok || ctx != "" || op != "" || entity != "" {
			t.Errorf("ParseEntitySubject(%q): got (%q, %q, %q, %v), want (\"\", \"\", \"\", false)", sub, ctx, op, entity, ok)
		}
	}
}

func TestParseShardSubjectRejects(t *testing.T) {
	for _, sub := range []string{
		"",
		"_kuma",
		"_kuma.default.shard.0.append",
		"_kuma.default.shard.0.append.a.b",
		"kuma.default.shard.0.append.x",
		"kuma.default.append.x",
		"_kuma.default.shards.0.append.x",
		"_kuma.default.SHARD.0.append.x",
		"_KUMA.default.shard.0.append.x",
		"_kuma.default.shard.0.append.x.",
		"__kuma.default.shard.0.append.x",
	} {
		if op, entity, ok := kuma.ParseShardSubject(sub); ok || op != "" || entity != "" {
			t.Errorf("ParseShardSubject(%q): got (%q, %q, %v), want (\"\", \"\", false)", sub, op, entity, ok)
		}
	}
}

func TestReplyAllowed(t *testing.T) {
	for reply, want := range map[string]bool{
		"":                           true,
		"_INBOX.abc.1":               true,
		"_INBOX.client.xyz":          true,
		"my.own.inbox":               true,
		"kumadb.replies.1":           true,
		"kuma":                       false,
		"kuma.default.events.0":      false,
		"_kuma":                      false,
		"_kuma.default.shard.0.x.y":  false,
		"_kuma.keyvault.shredded":    false,
		"$JS.API.STREAM.DELETE.KUMA": false,
		"$KV.KUMA_LEASES.lease.x.0":  false,
		"$SYS.REQ.SERVER.PING":       false,
	} {
		if got := kuma.ReplyAllowed(reply); got != want {
			t.Errorf("ReplyAllowed(%q) = %v, want %v", reply, got, want)
		}
	}
}
