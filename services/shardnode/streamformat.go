package shardnode

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/kuma"
)

// The stream format gate. A rolling upgrade runs old and new nodes on one
// stream, and a reader from before format 2 cannot read it (a projector
// stops at the message, a catch-up fails its take). So, like Kafka's
// log.message.format.version but without an operator's switch, a relay
// writes format 2 only while every process that may read the stream reads
// it:
//
//   - every live member of the cluster (a node of one, standalone, is a
//     cluster of one: its own projector is in the process) advertises format
//     2 in its record (cluster.Member.StreamFormats), which only a node of
//     this version or later does; and
//   - every projector durable on the stream of a context the node serves
//     reads it too (kuma.ConsumerMetaStreamFormats): a projector on its own
//     (`kuma serve --target projector`) is no member, but its durables are
//     how it reads the stream at all.
//
// Members are judged on every pass of the owner loop (a tick, or a change
// of the members bucket), from the member cache the node keeps anyway;
// durables are listed at start and with the replica check (every 10 s).
// Until the first look says otherwise the answer is format 1. Once a
// message of format 2 is in the stream, a reader older than format 2 can
// not read it: a downgrade after that is not supported.

// formatGate holds what the gate last found; the relays read format.
type formatGate struct {
	mu            sync.Mutex // orders updates: the owner loop and the replica check both make them
	membersRead2  bool
	durablesRead2 bool
	format        atomic.Int32 // 0 until the first look: format 1
}

// streamFormat is the format a relay writes now.
func (g *formatGate) streamFormat() int {
	if f := g.format.Load(); f != 0 {
		return int(f)
	}
	return kuma.StreamFormat1
}

// set records what a look found (members or durables, whichever is not
// nil) and decides the format.
func (g *formatGate) set(log *slog.Logger, membersRead2, durablesRead2 *bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if membersRead2 != nil {
		g.membersRead2 = *membersRead2
	}
	if durablesRead2 != nil {
		g.durablesRead2 = *durablesRead2
	}
	f := kuma.StreamFormat1
	if g.membersRead2 && g.durablesRead2 {
		f = kuma.StreamFormat2
	}
	if was := g.streamFormat(); was != f {
		log.Info("relays change the format of the stream messages they write", "format", f, "was", was,
			"every_member_reads_2", g.membersRead2, "every_projector_durable_reads_2", g.durablesRead2)
	}
	g.format.Store(int32(f))
}

// membersReadFormat2 reports whether every member reads format 2.
func membersReadFormat2(members []cluster.Member) bool {
	for _, m := range members {
		if !m.ReadsStreamFormat(kuma.StreamFormat2) {
			return false
		}
	}
	return true
}

// durablesReadFormat2 reports whether every projector durable (metadata
// as each consumer has it) reads format 2; other consumers (the catch-up's
// ordered ones, a user's own) are not counted.
func durablesReadFormat2(metadata []map[string]string) bool {
	for _, md := range metadata {
		if md[kuma.ConsumerMetaNode] != "" && !kuma.ListReadsFormat(md[kuma.ConsumerMetaStreamFormats], kuma.StreamFormat2) {
			return false
		}
	}
	return true
}

// judgeMembers updates the gate from the live members.
func (o *owner) judgeMembers() {
	ok := membersReadFormat2(o.members())
	o.s.formats.set(o.s.cfg.Logger, &ok, nil)
}

// judgeDurables updates the gate from the projector durables on the
// streams of the node's contexts. A stream that cannot be read leaves the
// gate as it was, except at the first look (format 1).
func (s *Service) judgeDurables(ctx context.Context) error {
	var mds []map[string]string
	for _, cc := range s.cfg.Contexts {
		st, err := s.js.Stream(ctx, kuma.StreamName(cc.Name))
		if err != nil {
			return fmt.Errorf("stream format: stream %s: %w", kuma.StreamName(cc.Name), err)
		}
		list := st.ListConsumers(ctx)
		for ci := range list.Info() {
			mds = append(mds, ci.Config.Metadata)
		}
		if err := list.Err(); err != nil {
			return fmt.Errorf("stream format: consumers of %s: %w", kuma.StreamName(cc.Name), err)
		}
	}
	ok := durablesReadFormat2(mds)
	s.formats.set(s.cfg.Logger, nil, &ok)
	return nil
}
