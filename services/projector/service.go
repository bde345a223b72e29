// Package projector keeps read models built from a context's event stream:
// the built-in entities projection (every entity's latest state) and the
// projections users declare (pkg/projection). It consumes the stream through
// Watermill's Router over watermill-nats's JetStream subscriber, one durable
// consumer per projection and generation with explicit acks and one message
// in flight, applies each message in one SQLite transaction together with the
// positions it reaches (a redelivery changes nothing), answers
// kuma.<ctx>.query.<name> (waiting for a position on request) and rebuilds
// any projection beside the live copy, swapping it in once it has caught up.
package projector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"
)

// Version is the projector's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// Service is a running projector. Its methods are safe for concurrent use.
type Service struct {
	cfg     Config
	nc      *nats.Conn
	dir     string
	log     *slog.Logger
	tracer  trace.Tracer
	keys    *keycache.Cache
	metrics *metrics
	// maxReply is the largest answer body, fixed at Start.
	maxReply int

	specs   map[string]*projection.Compiled
	router  *wmRouter
	catalog *catalog
	micro   *natsbus.Service
	shreds  *nats.Subscription
	runCtx  context.Context
	cancel  context.CancelFunc
	done    chan struct{}

	mu    sync.Mutex
	projs map[string]*projectionRT
	js    jetstream.JetStream

	// replicasSeen remembers the replicas the stream's durables named
	// (replicas.go), guarded by replicasMu.
	replicasMu   sync.Mutex
	replicasSeen map[string]seenReplica
}

// New validates the config and the declared projections; Start runs them.
func New(cfg Config, nc *nats.Conn) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	compiled, err := projection.CompileAll(context.Background(), cfg.Specs)
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, nc: nc, log: cfg.Logger, tracer: telemetry.Tracer(cfg.TracerProvider),
		dir: filepath.Join(cfg.DataDir, "projector", cfg.Context), specs: map[string]*projection.Compiled{},
		projs: map[string]*projectionRT{}, replicasSeen: map[string]seenReplica{}}
	for _, c := range compiled {
		if c.Spec.Name == EntitiesProjection {
			return nil, fmt.Errorf("projector: %q is the built-in projection's name", EntitiesProjection)
		}
		s.specs[c.Spec.Name] = c
	}
	s.keys = cfg.KeyCache
	if s.keys == nil {
		s.keys = keycache.New(cfg.Keys, cfg.KeyCacheSize, cfg.KeyCacheTTL, cfg.Now, s.tracer)
	}
	if s.metrics, err = newMetrics(cfg.Registerer, s); err != nil {
		return nil, err
	}
	return s, nil
}

// stream is the context's event stream.
func (s *Service) stream(ctx context.Context) (jetstream.Stream, error) {
	js, err := s.jetstream()
	if err != nil {
		return nil, err
	}
	st, err := js.Stream(ctx, kuma.StreamName(s.cfg.Context))
	if err != nil {
		return nil, fmt.Errorf("projector: stream %s: %w", kuma.StreamName(s.cfg.Context), err)
	}
	return st, nil
}

func (s *Service) jetstream() (jetstream.JetStream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.js == nil {
		js, err := jetstream.New(s.nc)
		if err != nil {
			return nil, err
		}
		s.js = js
	}
	return s.js, nil
}

// Start opens every projection's live generation (rebuilding one whose
// declaration changed, beside the old copy), starts consuming and answers
// queries. The context's stream must exist (the shardnode creates it); Start
// waits for it up to ctx.
func (s *Service) Start(ctx context.Context) error {
	s.maxReply = natsbus.ReplyLimit(s.nc)
	if s.cfg.MaxReplyBytes > 0 {
		s.maxReply = min(s.maxReply, s.cfg.MaxReplyBytes)
	}
	// Read models hold event data in clear: only Kuma's user may list or
	// read them (a folder an older Kuma made 0755 is narrowed).
	for _, dir := range []string{filepath.Dir(s.dir), s.dir} {
		if err := sqlite.PrepareDir(dir); err != nil {
			return fmt.Errorf("projector: %w", err)
		}
	}
	if err := s.waitForStream(ctx); err != nil {
		return err
	}
	var err error
	if s.catalog, err = openCatalog(ctx, filepath.Join(s.dir, "catalog.db")); err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(context.Background())
	s.router, err = newWMRouter(wmRouterConfig{Logger: s.log, RunCtx: runCtx, Dial: s.cfg.Dial,
		AckWait: s.cfg.AckWait, NakMax: s.cfg.StoppedRetryEvery, Retryable: retryable})
	if err != nil {
		cancel()
		return err
	}
	s.runCtx, s.cancel, s.done = runCtx, cancel, make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.router.run(); err != nil {
			s.log.Error("projector router stopped", "err", err)
		}
	}()
	<-s.router.running()

	names := []string{EntitiesProjection}
	for n := range s.specs {
		names = append(names, n)
	}
	sort.Strings(names[1:])
	for _, n := range names {
		if err := s.openProjection(ctx, n); err != nil {
			s.Stop(context.Background())
			return err
		}
	}
	s.noteOrphans(ctx)
	if s.shreds, err = s.keys.SubscribeShredded(s.nc); err != nil {
		s.Stop(context.Background())
		return err
	}
	if err := s.serve(ctx); err != nil {
		s.Stop(context.Background())
		return err
	}
	go s.watch(runCtx)
	return nil
}

func (s *Service) waitForStream(ctx context.Context) error {
	js, err := s.jetstream()
	if err != nil {
		return err
	}
	for {
		_, err := js.Stream(ctx, kuma.StreamName(s.cfg.Context))
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrStreamNotFound) && !errors.Is(err, nats.ErrNoResponders) && !errors.Is(err, jetstream.ErrJetStreamNotEnabled) {
			return fmt.Errorf("projector: stream %s: %w", kuma.StreamName(s.cfg.Context), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("projector: stream %s does not exist yet (is a shardnode running?): %w", kuma.StreamName(s.cfg.Context), ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// openProjection opens the live generation of one projection. A
// declaration that changed since that generation was built starts a
// rebuild; the old copy answers, with its own declaration, until the new one
// has caught up.
func (s *Service) openProjection(ctx context.Context, name string) error {
	want, err := s.specJSON(name)
	if err != nil {
		return err
	}
	p := &projectionRT{svc: s, name: name, changed: make(chan struct{}), nextSpec: want}
	p.newModel = func(spec string) (model, error) { return s.model(ctx, name, spec) }
	live, building, err := s.catalog.get(ctx, name)
	if err != nil {
		return err
	}
	spec := want
	if live > 0 {
		if stored, err := storedSpec(ctx, p.path(live)); err == nil {
			spec = stored
		} else {
			s.log.Warn("live read model unreadable; building it again", "projection", name, "err", err)
			live = 0
		}
	}
	if live == 0 {
		// First start (or an unreadable file): this generation is built
		// from the first event while it answers.
		live = max(building, 1)
		if err := removeFiles(p.path(live)); err != nil {
			return err
		}
		if err := s.catalog.setLive(ctx, name, live); err != nil {
			return err
		}
		spec = want
	}
	g, err := p.open(ctx, live, spec)
	if err != nil {
		return err
	}
	// The generation may already be applying (the stream is never empty
	// once a shard is claimed), and applied reads live under p.mu.
	p.mu.Lock()
	p.live = g
	p.mu.Unlock()
	s.mu.Lock()
	s.projs[name] = p
	s.mu.Unlock()
	if spec != want || building > live {
		if spec != want {
			s.log.Info("projection declaration changed; rebuilding beside the live copy", "projection", name)
		}
		if _, err := p.rebuild(ctx); err != nil {
			return err
		}
	}
	return nil
}

// specJSON is the canonical form of a projection's declaration; a change
// of it means the read model must be rebuilt.
func (s *Service) specJSON(name string) (string, error) {
	if name == EntitiesProjection {
		return `{"name":"entities","builtin":1}`, nil
	}
	b, err := json.Marshal(s.specs[name].Spec)
	return string(b), err
}

func (s *Service) model(ctx context.Context, name, spec string) (model, error) {
	if name == EntitiesProjection {
		return &entities{reducer: s.cfg.Reducer}, nil
	}
	if want, _ := s.specJSON(name); spec == want {
		return &declared{c: s.specs[name]}, nil
	}
	var sp projection.Spec
	if err := json.Unmarshal([]byte(spec), &sp); err != nil {
		return nil, err
	}
	c, err := projection.Compile(ctx, sp)
	if err != nil {
		return nil, fmt.Errorf("projector: the stored declaration of %q no longer compiles: %w", name, err)
	}
	return &declared{c: c}, nil
}

// watch completes rebuilds that have nothing left to apply and keeps the
// lag gauge fresh.
func (s *Service) watch(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	tick := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, p := range s.projections() {
			p.checkCaughtUp()
		}
		tick++
		// The replicas the durables name, remembered (rememberReplicas)
		// from the first second and every 10 s: a durable lives on its
		// replica's own server (consumer.go), so once that node dies its
		// durables are listed nowhere, and status must already know it
		// to show it as unavailable.
		if tick%50 == 5 {
			ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, _ = s.knownReplicas(ictx)
			cancel()
		}
		// A durable deleted under a subscription is normally reported
		// by it; this catches the case where it is not.
		if tick%5 == 0 {
			// A generation at the stream's end has nothing to wait for:
			// only one behind it can be stalled (and costs a look at its
			// durable).
			var last uint64
			ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if st, err := s.stream(ictx); err == nil {
				if info, err := st.Info(ictx); err == nil {
					last = info.State.LastSeq
				}
			}
			cancel()
			for _, p := range s.projections() {
				p.mu.Lock()
				gens := []*generation{p.live, p.next}
				p.mu.Unlock()
				for _, g := range gens {
					if g != nil && !g.ended() && g.consumerGone() {
						g.resubscribe()
					} else if g != nil && !g.ended() && g.rm.seq() < last && g.stalled(s.cfg.StallAfter) {
						g.replace(replaceStalled)
					} else if g != nil && !g.ended() {
						s.rehome(g)
					}
				}
			}
		}
	}
}

// rehome moves a generation's durable to the projector's own server when it
// was placed elsewhere (consumer.go gives up after a few tries, and a server
// just restarted may not be chosen until it is caught up): at most every
// 10 s, doubling to 5 min while the moves miss, so that a server that is
// never chosen costs little.
func (s *Service) rehome(g *generation) {
	now := time.Now()
	if now.Before(g.rehomeAt) {
		return
	}
	if !g.away() {
		g.rehomeEvery, g.rehomeAt = 0, now.Add(rehomeFirst)
		return
	}
	g.replace(replaceAway)
	g.rehomeEvery = min(max(2*g.rehomeEvery, rehomeFirst), rehomeMax)
	g.rehomeAt = time.Now().Add(g.rehomeEvery)
}

// The waits of rehome.
const (
	rehomeFirst = 10 * time.Second
	rehomeMax   = 5 * time.Minute
)

func (s *Service) projections() []*projectionRT {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*projectionRT, 0, len(s.projs))
	for _, p := range s.projs {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

func (s *Service) projection(name string) (*projectionRT, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.projs[name]
	if p == nil {
		return nil, kuma.Errorf(kuma.CodeNotFound, "no projection %q in context %q", name, s.cfg.Context)
	}
	return p, nil
}

// Stop stops answering, then stops every consumer; the read models keep
// their positions, so the next start goes on where this one stopped.
func (s *Service) Stop(ctx context.Context) error {
	var errs []error
	if s.micro != nil {
		errs = append(errs, s.micro.Stop())
	}
	if s.shreds != nil {
		_ = s.shreds.Unsubscribe()
	}
	var gens []*generation
	for _, p := range s.projections() {
		p.mu.Lock()
		for _, g := range []*generation{p.live, p.next} {
			if g != nil {
				gens = append(gens, g)
			}
		}
		p.mu.Unlock()
	}
	// No subscription is added from here on (a durable replaced
	// meanwhile).
	if s.router != nil {
		s.router.refuse()
	}
	// Let the deliveries in flight finish and no other start; then the
	// router closes every subscriber at once.
	for _, g := range gens {
		g.closeGate()
	}
	if s.router != nil {
		errs = append(errs, s.router.close())
		s.cancel()
		<-s.done
	}
	for _, g := range gens {
		errs = append(errs, g.stop(ctx, false))
	}
	if s.catalog != nil {
		errs = append(errs, s.catalog.close())
	}
	return errors.Join(errs...)
}
