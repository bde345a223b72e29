package projector

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"go.opentelemetry.io/otel/trace"
)

// projectionRT is one projection at run time: the generation that answers
// queries and, during a rebuild, the one being built beside it.
type projectionRT struct {
	svc  *Service
	name string

	rebuilding sync.Mutex // one rebuild request at a time

	mu       sync.Mutex
	live     *generation
	next     *generation // being rebuilt; nil otherwise
	changed  chan struct{}
	nextSpec string // the spec a rebuild builds with
	newModel func(spec string) (model, error)
}

func (p *projectionRT) path(gen int64) string {
	return filepath.Join(p.svc.dir, p.name+"."+strconv.FormatInt(gen, 10)+".db")
}

// open opens a generation's read model and starts feeding it.
func (p *projectionRT) open(ctx context.Context, gen int64, spec string) (*generation, error) {
	m, err := p.newModel(spec)
	if err != nil {
		return nil, err
	}
	rm, err := openReadModel(ctx, p.path(gen), m, spec)
	if err != nil {
		return nil, err
	}
	g := &generation{p: p, gen: gen, rm: rm, spec: spec, started: p.svc.cfg.Now(),
		prefix: consumerPrefix(p.svc.cfg.NodeName, p.svc.cfg.Context, p.name, gen), feed: p.svc.router.newFeed()}
	if err := g.run(ctx); err != nil {
		rm.close()
		return nil, err
	}
	return g, nil
}

// applied is called after each commit of a generation: it wakes readers
// waiting for a position and, during a rebuild, swaps the new copy in once it
// has caught up with the live one.
func (p *projectionRT) applied(g *generation) {
	p.mu.Lock()
	if g == p.next && g.rm.seq() >= p.live.rm.seq() {
		p.mu.Unlock()
		p.swap(g)
		return
	}
	if g == p.live {
		close(p.changed)
		p.changed = make(chan struct{})
	}
	p.mu.Unlock()
}

// swap makes a caught-up rebuild the live generation. The catalog is
// updated first, so a crash right after still opens the new copy; queries
// running on the old copy finish before its file goes.
func (p *projectionRT) swap(g *generation) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p.mu.Lock()
	if p.next != g {
		p.mu.Unlock()
		return
	}
	if err := p.svc.catalog.setLive(ctx, p.name, g.gen); err != nil {
		p.mu.Unlock()
		p.svc.log.Error("rebuild could not be swapped in; will try again", "projection", p.name, "err", err)
		return
	}
	old := p.live
	p.live, p.next = g, nil
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	p.svc.log.Info("rebuild caught up and swapped in", "projection", p.name, "generation", g.gen,
		"took", p.svc.cfg.Now().Sub(g.started).String())
	// The old generation stops in the background: stopping waits for its
	// delivery in flight, which may be waiting for this projection's lock.
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := old.stop(ctx, true); err != nil {
			p.svc.log.Warn("old generation not fully removed", "projection", p.name, "generation", old.gen, "err", err)
		}
	}()
}

// rebuild starts building a fresh generation from the first event, unless
// one is being built.
func (p *projectionRT) rebuild(ctx context.Context) (*kuma.RebuildReply, error) {
	p.rebuilding.Lock()
	defer p.rebuilding.Unlock()
	p.mu.Lock()
	if p.next != nil {
		gen := p.next.gen
		p.mu.Unlock()
		return &kuma.RebuildReply{Projection: p.name, Generation: gen, Started: false}, nil
	}
	gen := p.live.gen + 1
	spec := p.nextSpec
	p.mu.Unlock()
	next, err := p.start(ctx, gen, spec)
	if err != nil {
		return nil, err
	}
	return &kuma.RebuildReply{Projection: p.name, Generation: next.gen, Started: true}, nil
}

// start opens a new generation for a rebuild, from an empty file.
func (p *projectionRT) start(ctx context.Context, gen int64, spec string) (*generation, error) {
	svc := p.svc
	// A leftover of a rebuild interrupted by a crash is started over.
	if err := removeFiles(p.path(gen)); err != nil {
		return nil, err
	}
	var target uint64
	s, err := svc.stream(ctx)
	if err != nil {
		return nil, err
	}
	// Durables a crashed rebuild left go when the generation subscribes
	// (ensureConsumer).
	if info, err := s.Info(ctx); err == nil {
		target = info.State.LastSeq
	}
	if err := svc.catalog.setBuilding(ctx, p.name, gen); err != nil {
		return nil, err
	}
	g, err := p.open(ctx, gen, spec)
	if err != nil {
		return nil, err
	}
	g.target.Store(target)
	p.mu.Lock()
	p.next = g
	p.mu.Unlock()
	svc.log.Info("rebuild started", "projection", p.name, "generation", gen)
	// An empty stream, or one the live copy has not moved in, never calls
	// applied: check once now; the status ticker checks again.
	p.checkCaughtUp()
	return g, nil
}

// checkCaughtUp swaps a rebuild in when it is as far as the live copy.
func (p *projectionRT) checkCaughtUp() {
	p.mu.Lock()
	next := p.next
	ready := next != nil && next.rm.seq() >= p.live.rm.seq() && next.target.Load() <= next.rm.seq()
	p.mu.Unlock()
	if ready {
		p.swap(next)
	}
}

// wait blocks until the live generation has applied pos, or d passes.
func (p *projectionRT) wait(ctx context.Context, pos kuma.Position, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		p.mu.Lock()
		live, ch := p.live, p.changed
		p.mu.Unlock()
		if live.rm.applied(pos) {
			return nil
		}
		select {
		case <-ch:
		case <-timer.C:
			return kuma.Errorf(kuma.CodeTimeout, "projection %q has not applied %s yet; retry, or wait longer with wait_ms", p.name, pos)
		case <-ctx.Done():
			return kuma.Errorf(kuma.CodeTimeout, "projection %q has not applied %s yet", p.name, pos)
		}
	}
}

// appliedSpan is the span of the live copy's last apply in a shard.
func (p *projectionRT) appliedSpan(shard int) trace.SpanContext {
	p.mu.Lock()
	live := p.live
	p.mu.Unlock()
	return live.rm.spanOf(shard)
}

// query answers from the live generation; if a swap closed the copy under
// it, it asks the new live one.
func (p *projectionRT) query(ctx context.Context, r *kuma.QueryRequest, maxReply int) (*kuma.QueryReply, error) {
	for {
		p.mu.Lock()
		live := p.live
		p.mu.Unlock()
		out, ok, err := live.rm.query(ctx, r, maxReply)
		if ok {
			return out, err
		}
	}
}

// act is an operator's retry or skip of the event a generation stopped at.
// skip must name that event's position, so that the event skipped is the
// one the operator looked at.
func (p *projectionRT) act(op, position string) error {
	p.mu.Lock()
	gens := []*generation{p.live}
	if p.next != nil {
		gens = append(gens, p.next)
	}
	p.mu.Unlock()
	acted := false
	var stoppedAt []string
	for _, g := range gens {
		g.mu.Lock()
		if !g.stopped {
			g.mu.Unlock()
			continue
		}
		at := g.failure.Position
		switch {
		case op == "retry":
			g.retry, acted = true, true
		case position == at:
			g.skip, acted = position, true
		default:
			stoppedAt = append(stoppedAt, at)
		}
		g.mu.Unlock()
		p.svc.log.Info("operator "+op, "projection", p.name, "generation", g.gen, "position", at, "acted", acted)
	}
	switch {
	case acted:
		return nil
	case len(stoppedAt) > 0:
		return kuma.Errorf(kuma.CodeBadRequest, "projection %q is stopped at %s, not %q; skip names the event it stopped at",
			p.name, strings.Join(stoppedAt, " and "), position)
	}
	return kuma.Errorf(kuma.CodeBadRequest, "projection %q is not stopped at an event", p.name)
}

// status reports the live generation and any rebuild.
func (p *projectionRT) status(last uint64) kuma.ProjectionStatus {
	p.mu.Lock()
	live, next := p.live, p.next
	p.mu.Unlock()
	pos, lastPos, seq, skipped := live.rm.snapshot()
	st := kuma.ProjectionStatus{Name: p.name, Node: p.svc.cfg.NodeName, Generation: live.gen,
		Positions: pos, Applied: seq, Skipped: skipped, State: "running"}
	if lastPos.Seq > 0 {
		st.Position = lastPos.String()
	}
	if last > seq {
		st.Lag = int64(last - seq)
	}
	st.State, st.Error = live.health()
	if next != nil {
		_, _, nseq, _ := next.rm.snapshot()
		target := max(next.target.Load(), seq)
		rs := &kuma.RebuildStatus{Generation: next.gen, Applied: nseq, Target: target, StartedAt: next.started, State: "running"}
		if target > 0 {
			rs.Progress = min(1, float64(nseq)/float64(target))
		} else {
			rs.Progress = 1
		}
		rs.State, rs.Error = next.health()
		st.Rebuild = rs
	}
	return st
}
