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
	"strings"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/keycache"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/kumadb/kuma/pkg/sqlite"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
)

// Version is the projector's semver, shown by `nats micro ls`.
const Version = "0.1.0"

// KeyVault is what the projector needs of the keyvault: keys to open
// payloads (by the pseudonym the stream names an entity by), and its word
// that an entity was forgotten before a notice drops anything.
type KeyVault interface {
	keycache.Vault
	// Forgotten returns the forget record of an entity, or nil.
	Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error)
	// ForgottenPseudonym returns the forget record of the entity of a
	// pseudonym, or nil.
	ForgottenPseudonym(ctx context.Context, kctx, pseudonym string) (*kuma.ForgetReply, error)
}

// Config configures a projector for one context.
type Config struct {
	Context string
	// Reducer folds the entities projection's states; nil is merge patch,
	// as in the shardnode. It must be the shardnode's reducer.
	Reducer kuma.Reducer
	// DataDir holds the read models, under <DataDir>/projector/<context>.
	DataDir string
	// NodeName names this projector's durable consumers: each projector
	// instance keeps its own read models.
	NodeName string
	// Specs are the declared projections.
	Specs []projection.Spec
	// Keys opens payloads and confirms forget notices: the keyvault in
	// process or over NATS.
	Keys KeyVault
	// Dial opens a NATS connection for one generation's subscriber (closing
	// a Watermill subscriber drains its connection, so none is shared).
	Dial func() (*nats.Conn, error)

	QueryTimeout time.Duration // a query's time limit (default 2s)
	// MaxReplyBytes bounds one answer's body (0: the NATS server's max
	// payload less natsbus.ReplyHeadroom; never more than that). Query
	// pages are cut to fit it, with next_cursor for the rest.
	MaxReplyBytes int
	// ReplicaStatusWait bounds how long a status request waits for the
	// other replicas' answers (default 1s), ReplicaAdminWait the same for
	// rebuild, retry and skip (default 3s). A replica that answers later
	// is reported missing.
	ReplicaStatusWait time.Duration
	ReplicaAdminWait  time.Duration
	AckWait           time.Duration // longest apply of one message (default 30s)
	// StallAfter is how long a generation may see no delivery while its
	// durable counts one out before it is recreated (default 5s; see
	// generation.stalled). It must exceed StoppedRetryEvery.
	StallAfter        time.Duration
	StoppedRetryEvery time.Duration // how often a stopped projection looks for an operator's action (default 1s)
	KeyCacheSize      int
	KeyCacheTTL       time.Duration

	// Failpoint is the fault tests' hook: projector-before-apply and
	// projector-after-apply (committed, not yet acknowledged).
	Failpoint func(name string)

	Logger         *slog.Logger
	Now            func() time.Time
	Registerer     prometheus.Registerer
	TracerProvider trace.TracerProvider
}

func (c *Config) setDefaults() {
	if c.Reducer == nil {
		c.Reducer = kuma.MergePatch{}
	}
	if c.NodeName == "" {
		c.NodeName = cluster.DefaultNodeName()
	}
	if c.QueryTimeout == 0 {
		c.QueryTimeout = 2 * time.Second
	}
	if c.ReplicaStatusWait == 0 {
		c.ReplicaStatusWait = time.Second
	}
	if c.ReplicaAdminWait == 0 {
		c.ReplicaAdminWait = 3 * time.Second
	}
	if c.AckWait == 0 {
		c.AckWait = 30 * time.Second
	}
	if c.StoppedRetryEvery == 0 {
		c.StoppedRetryEvery = time.Second
	}
	if c.StallAfter == 0 {
		c.StallAfter = max(5*time.Second, 3*c.StoppedRetryEvery)
	}
	if c.KeyCacheSize == 0 {
		c.KeyCacheSize = 100_000
	}
	if c.KeyCacheTTL == 0 {
		c.KeyCacheTTL = 5 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Failpoint == nil {
		c.Failpoint = func(string) {}
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
}

// Validate reports every problem of the config at once.
func (c *Config) Validate() error {
	var errs []error
	if err := kuma.ValidateContext(c.Context); err != nil {
		errs = append(errs, err)
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("projector: DataDir is required (read models live under it)"))
	}
	if c.Keys == nil {
		errs = append(errs, errors.New("projector: Keys is required to open event payloads"))
	}
	if c.Dial == nil {
		errs = append(errs, errors.New("projector: Dial is required (each subscriber has its own connection)"))
	}
	return errors.Join(errs...)
}

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
		projs: map[string]*projectionRT{}}
	for _, c := range compiled {
		if c.Spec.Name == EntitiesProjection {
			return nil, fmt.Errorf("projector: %q is the built-in projection's name", EntitiesProjection)
		}
		s.specs[c.Spec.Name] = c
	}
	s.keys = keycache.New(cfg.Keys, cfg.KeyCacheSize, cfg.KeyCacheTTL, cfg.Now, s.tracer)
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
		// A durable deleted under a subscription is normally reported
		// by it; this catches the case where it is not.
		if tick++; tick%5 == 0 {
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
						g.replace(true)
					}
				}
			}
		}
	}
}

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

// Query answers a query, waiting first for r.After when given.
func (s *Service) Query(ctx context.Context, name string, r *kuma.QueryRequest) (*kuma.QueryReply, error) {
	p, err := s.projection(name)
	if err != nil {
		return nil, err
	}
	after, wait, err := r.Validate()
	if err != nil {
		return nil, err
	}
	ctx, span := s.tracer.Start(ctx, "kuma.projector query "+name, trace.WithSpanKind(trace.SpanKindServer))
	defer span.End()
	if after.Seq > 0 {
		if err := p.wait(ctx, after, wait); err != nil {
			// Each replica waits for its own copy: a replica far behind
			// times out where another would answer. The node says which;
			// a retry may reach another replica (timeout is retryable).
			if kerr := kuma.AsError(err); kerr.Code == kuma.CodeTimeout {
				kerr.Details = map[string]any{"node": s.cfg.NodeName}
				return nil, kerr
			}
			return nil, err
		}
		// The query joins the trace of the write it waited for, through
		// the apply that brought it in.
		if sc := p.appliedSpan(after.Shard); sc.IsValid() {
			span.AddLink(trace.Link{SpanContext: sc})
		}
	}
	qctx, cancel := context.WithTimeout(ctx, s.cfg.QueryTimeout)
	defer cancel()
	return p.query(qctx, r, s.maxReply)
}

// Rebuild starts a rebuild of one projection and returns at once.
func (s *Service) Rebuild(ctx context.Context, name string) (*kuma.RebuildReply, error) {
	p, err := s.projection(name)
	if err != nil {
		return nil, err
	}
	return p.rebuild(ctx)
}

// Retry makes a projection stopped at a failed event try it again.
func (s *Service) Retry(name string) error {
	p, err := s.projection(name)
	if err != nil {
		return err
	}
	return p.act("retry", "")
}

// Skip makes a projection stopped at the event at position skip it; the
// skip is recorded in the read model (_kuma_skipped) and counted in status.
func (s *Service) Skip(name, position string) error {
	p, err := s.projection(name)
	if err != nil {
		return err
	}
	if position != forgetPosition && !isRejectedPosition(position) {
		if _, err := kuma.ParsePosition(position); err != nil {
			return err
		}
	}
	return p.act("skip", position)
}

// Status reports every projection, in name order.
func (s *Service) Status(ctx context.Context) ([]kuma.ProjectionStatus, error) {
	var last uint64
	if st, err := s.stream(ctx); err == nil {
		if info, err := st.Info(ctx); err == nil {
			last = info.State.LastSeq
		}
	}
	out := []kuma.ProjectionStatus{}
	for _, p := range s.projections() {
		out = append(out, p.status(last))
	}
	return out, nil
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

// serve registers the NATS micro service "kuma-projector": queries, the
// admin subjects and the status part a shardnode includes in its answer.
func (s *Service) serve(ctx context.Context) error {
	svc, err := natsbus.AddService(s.nc, natsbus.ServiceConfig{
		Name: "kuma-projector", Version: Version,
		Description: "Read models from the event stream: queries, rebuilds",
		QueueGroup:  "kuma-projector",
	})
	if err != nil {
		return fmt.Errorf("projector: register micro service: %w", err)
	}
	s.micro = svc
	kctx := s.cfg.Context
	name := func(req micro.Request) string {
		subj := req.Subject()
		return subj[strings.LastIndexByte(subj, '.')+1:]
	}
	endpoints := []struct {
		name, subject string
		h             func(ctx context.Context, req micro.Request) (any, error)
	}{
		{"query", kuma.QuerySubject(kctx, "*"), func(ctx context.Context, req micro.Request) (any, error) {
			var r kuma.QueryRequest
			if err := kuma.Decode(req.Data(), &r); err != nil {
				return nil, err
			}
			return s.Query(ctx, name(req), &r)
		}},
		// Admin commands and status reach every replica (replicas.go).
		{"rebuild", kuma.ProjectionAdminSubject(kctx, "rebuild", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			if err := kuma.DecodeEmpty(req.Data()); err != nil {
				return nil, err
			}
			return s.RebuildAll(ctx, name(req))
		}},
		{"retry", kuma.ProjectionAdminSubject(kctx, "retry", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			if err := kuma.DecodeEmpty(req.Data()); err != nil {
				return nil, err
			}
			return s.RetryAll(ctx, name(req))
		}},
		{"skip", kuma.ProjectionAdminSubject(kctx, "skip", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			var r kuma.SkipRequest
			if err := kuma.Decode(req.Data(), &r); err != nil {
				return nil, err
			}
			return s.SkipAll(ctx, name(req), r.Position)
		}},
		{"drop", kuma.ProjectionAdminSubject(kctx, "drop", "*"), func(ctx context.Context, req micro.Request) (any, error) {
			if err := kuma.DecodeEmpty(req.Data()); err != nil {
				return nil, err
			}
			return s.DropAll(ctx, name(req))
		}},
		{"status", kuma.ProjectorStatusSubject(kctx), func(ctx context.Context, req micro.Request) (any, error) {
			return s.StatusAll(ctx)
		}},
	}
	for _, op := range []string{"rebuild", "retry", "skip", "drop", "status"} {
		// Every replica, outside the queue group; natsbus.Service refuses
		// a reserved reply subject here as on every endpoint.
		err := svc.AddBroadcastEndpoint("replicas-"+op+"-"+kctx, kuma.ProjectorReplicasSubject(kctx, op), micro.HandlerFunc(func(req micro.Request) {
			ctx := telemetry.Extract(context.Background(), nats.Header(req.Headers()))
			ctx, cancel := context.WithTimeout(ctx, s.cfg.ReplicaAdminWait)
			defer cancel()
			var r replicaRequest
			var a replicaAnswer
			if err := json.Unmarshal(req.Data(), &r); err != nil {
				a = replicaAnswer{Node: s.cfg.NodeName, Error: kuma.Errorf(kuma.CodeBadRequest, "replica request: %v", err)}
			} else {
				a = s.replicaOp(ctx, op, &r)
			}
			body, _ := json.Marshal(a)
			code := "ok"
			if a.Error != nil {
				code = string(a.Error.Code)
			}
			s.metrics.requests.WithLabelValues("replicas-"+op, code).Inc()
			if err := req.Respond(body); err != nil {
				s.metrics.repliesFailed.WithLabelValues("replicas-"+op, string(natsbus.ReplyFailureCode(err))).Inc()
				s.log.Warn("projector reply failed", "subject", req.Subject(), "err", err)
			}
		}))
		if err != nil {
			return fmt.Errorf("projector: endpoint replicas-%s: %w", op, err)
		}
	}
	for _, e := range endpoints {
		name := e.name
		err := svc.AddEndpoint(name+"-"+kctx, e.subject, natsbus.JSONEndpoint{
			Answer:   e.h,
			Timeout:  kuma.MaxQueryWait*time.Millisecond + s.cfg.QueryTimeout + time.Second,
			MaxReply: s.maxReply,
			Hint:     "ask for fewer rows with limit",
			// Counted before the reply goes: whoever got a reply finds
			// it counted.
			Answered: func(req micro.Request, err error) {
				s.metrics.requests.WithLabelValues(name, natsbus.Code(err)).Inc()
				if err != nil {
					s.log.Debug("projector request failed", "subject", req.Subject(), "err", err)
				}
			},
			ReplyFailed: func(req micro.Request, err error) {
				s.metrics.repliesFailed.WithLabelValues(name, string(natsbus.ReplyFailureCode(err))).Inc()
				s.log.Warn("projector reply failed", "subject", req.Subject(), "err", err)
			},
		})
		if err != nil {
			return fmt.Errorf("projector: endpoint %s: %w", e.name, err)
		}
	}
	return natsbus.Flush(ctx, s.nc)
}
