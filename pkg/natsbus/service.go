package natsbus

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"
)

// ServiceConfig names a Service as `nats micro` shows it.
type ServiceConfig struct {
	Name        string // [A-Za-z0-9_-]+
	Version     string // semver
	Description string
	// QueueGroup is the queue group of every endpoint: one member answers.
	QueueGroup string
	// Refused, when set, is called (on the subscription's goroutine) for
	// every request dropped because of its reply subject.
	Refused func(subject, reply string)
	// Concurrency is how many requests of one endpoint are handled at
	// once, each on a goroutine of its own; while that many run, the
	// subscription waits (and NATS buffers). 0 or 1: one at a time on the
	// subscription's goroutine, as with micro. A handler that waits on
	// other servers wants more: one slow answer must not hold up the
	// requests behind it.
	Concurrency int
}

// Service is a NATS micro service: endpoints in one queue group, and the
// discovery subjects $SRV.PING|INFO|STATS[.name[.id]] that `nats micro`
// uses, answering with micro's own JSON types.
//
// It exists instead of micro.AddService because micro's $SRV handlers
// answer any reply subject and cannot be wrapped: `nats pub $SRV.PING
// --reply kuma.<ctx>.events.<n>` made a service publish its ping into an
// event stream with its own rights. Here every request, discovery or
// endpoint, whose reply lies in a reserved namespace (kuma.ReplyAllowed) is
// dropped unanswered before its handler runs.
//
// Methods are safe for concurrent use; each endpoint's handler runs on its
// subscription's goroutine, one request at a time, as with micro, unless
// ServiceConfig.Concurrency allows more.
type Service struct {
	nc      *nats.Conn
	cfg     ServiceConfig
	id      string
	started time.Time

	mu        sync.Mutex
	endpoints []*endpoint
	subs      []*nats.Subscription
	stopped   bool
}

type endpoint struct {
	name, subject string
	queue         string // "" for a broadcast endpoint
	handler       micro.Handler
	sub           *nats.Subscription
	stats         micro.EndpointStats // under Service.mu
	slots         chan struct{}       // with Concurrency > 1: one per request in hand
}

// AddService starts the discovery handlers of a new service on nc.
// Endpoints are added with AddEndpoint; Stop ends them all.
func AddService(nc *nats.Conn, cfg ServiceConfig) (*Service, error) {
	if cfg.Name == "" || cfg.Version == "" {
		return nil, errors.New("natsbus: a service needs a name and a version")
	}
	s := &Service{nc: nc, cfg: cfg, id: nuid.Next(), started: time.Now().UTC()}
	verbs := map[micro.Verb]func() any{
		micro.PingVerb:  func() any { return micro.Ping{ServiceIdentity: s.identity(), Type: micro.PingResponseType} },
		micro.InfoVerb:  func() any { return s.Info() },
		micro.StatsVerb: func() any { return s.Stats() },
	}
	for verb, answer := range verbs {
		// $SRV.<VERB>, $SRV.<VERB>.<name>, $SRV.<VERB>.<name>.<id>.
		for _, kind := range [][2]string{{"", ""}, {cfg.Name, ""}, {cfg.Name, s.id}} {
			subj, err := micro.ControlSubject(verb, kind[0], kind[1])
			if err == nil {
				var sub *nats.Subscription
				sub, err = nc.Subscribe(subj, func(m *nats.Msg) {
					if !s.allowed(m) {
						return
					}
					body, _ := json.Marshal(answer())
					_ = m.Respond(body)
				})
				if err == nil {
					s.subs = append(s.subs, sub)
				}
			}
			if err != nil {
				_ = s.Stop()
				return nil, fmt.Errorf("natsbus: service %s: %w", cfg.Name, err)
			}
		}
	}
	return s, nil
}

// allowed reports whether m may be answered, and tells cfg.Refused when not.
func (s *Service) allowed(m *nats.Msg) bool {
	if kuma.ReplyAllowed(m.Reply) {
		return true
	}
	if s.cfg.Refused != nil {
		s.cfg.Refused(m.Subject, m.Reply)
	}
	return false
}

// AddEndpoint answers requests on subject (wildcards allowed) with h, in
// the service's queue group. name is the endpoint's name in INFO and STATS.
func (s *Service) AddEndpoint(name, subject string, h micro.Handler) error {
	return s.addEndpoint(name, subject, s.cfg.QueueGroup, h)
}

// AddBroadcastEndpoint answers requests on subject with h outside any queue
// group: every instance of the service receives each request, and the
// requester gathers their answers (Gather). Reply subjects are checked as
// for AddEndpoint.
func (s *Service) AddBroadcastEndpoint(name, subject string, h micro.Handler) error {
	return s.addEndpoint(name, subject, "", h)
}

func (s *Service) addEndpoint(name, subject, queue string, h micro.Handler) error {
	e := &endpoint{name: name, subject: subject, queue: queue, handler: h}
	if s.cfg.Concurrency > 1 {
		e.slots = make(chan struct{}, s.cfg.Concurrency)
	}
	e.stats = micro.EndpointStats{Name: name, Subject: subject, QueueGroup: queue}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return fmt.Errorf("natsbus: service %s is stopped", s.cfg.Name)
	}
	sub, err := s.nc.QueueSubscribe(subject, queue, func(m *nats.Msg) { s.handle(e, m) })
	if err != nil {
		return fmt.Errorf("natsbus: endpoint %s on %s: %w", name, subject, err)
	}
	e.sub = sub
	s.endpoints = append(s.endpoints, e)
	return nil
}

func (s *Service) handle(e *endpoint, m *nats.Msg) {
	if !s.allowed(m) {
		return
	}
	if e.slots == nil {
		s.serve(e, m)
		return
	}
	e.slots <- struct{}{}
	go func() {
		defer func() { <-e.slots }()
		s.serve(e, m)
	}()
}

// serve runs the endpoint's handler on one request and counts it.
func (s *Service) serve(e *endpoint, m *nats.Msg) {
	start := time.Now()
	req := &request{msg: m}
	e.handler.Handle(req)
	took := time.Since(start)
	s.mu.Lock()
	defer s.mu.Unlock()
	e.stats.NumRequests++
	e.stats.ProcessingTime += took
	e.stats.AverageProcessingTime = e.stats.ProcessingTime / time.Duration(e.stats.NumRequests)
	if err := req.failure(); err != nil {
		e.stats.NumErrors++
		e.stats.LastError = err.Error()
	}
}

// Stop drains every subscription of the service: requests already received
// are still handled (with Concurrency, possibly after Stop returns).
// Stopping twice is harmless.
func (s *Service) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	var errs []error
	for _, e := range s.endpoints {
		errs = append(errs, drain(e.sub))
	}
	for _, sub := range s.subs {
		errs = append(errs, drain(sub))
	}
	return errors.Join(errs...)
}

func drain(sub *nats.Subscription) error {
	if err := sub.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		return fmt.Errorf("natsbus: drain %s: %w", sub.Subject, err)
	}
	return nil
}

func (s *Service) identity() micro.ServiceIdentity {
	return micro.ServiceIdentity{Name: s.cfg.Name, ID: s.id, Version: s.cfg.Version, Metadata: map[string]string{}}
}

// Info is the service's $SRV.INFO answer.
func (s *Service) Info() micro.Info {
	s.mu.Lock()
	defer s.mu.Unlock()
	eps := make([]micro.EndpointInfo, 0, len(s.endpoints))
	for _, e := range s.endpoints {
		eps = append(eps, micro.EndpointInfo{Name: e.name, Subject: e.subject, QueueGroup: e.queue, Metadata: map[string]string{}})
	}
	return micro.Info{ServiceIdentity: s.identity(), Type: micro.InfoResponseType, Description: s.cfg.Description, Endpoints: eps}
}

// Stats is the service's $SRV.STATS answer.
func (s *Service) Stats() micro.Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	eps := make([]*micro.EndpointStats, 0, len(s.endpoints))
	for _, e := range s.endpoints {
		st := e.stats
		eps = append(eps, &st)
	}
	return micro.Stats{ServiceIdentity: s.identity(), Type: micro.StatsResponseType, Started: s.started, Endpoints: eps}
}

// request is micro.Request over one message. Its reply subject was checked
// before the handler got it; Respond checks again, so no path around the
// check exists.
type request struct {
	msg *nats.Msg
	// err is the failure STATS records: a reply that failed or an Error.
	// A handler may answer from a goroutine of its own after Handle has
	// returned (the router's feed does), so it is guarded; such a late
	// failure is not counted.
	mu  sync.Mutex
	err error
}

func (r *request) fail(err error) error {
	r.mu.Lock()
	r.err = err
	r.mu.Unlock()
	return err
}

func (r *request) failure() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

var _ micro.Request = (*request)(nil)

func (r *request) Respond(data []byte, opts ...micro.RespondOpt) error {
	out := &nats.Msg{Data: data, Header: nats.Header{}}
	for _, opt := range opts {
		opt(out)
	}
	return r.send(out)
}

func (r *request) send(out *nats.Msg) error {
	if r.msg.Reply == "" || !kuma.ReplyAllowed(r.msg.Reply) {
		return nil
	}
	out.Subject = r.msg.Reply
	if len(out.Header) == 0 {
		out.Header = nil
	}
	if err := r.msg.RespondMsg(out); err != nil {
		return r.fail(fmt.Errorf("%w: %w", micro.ErrRespond, err))
	}
	return nil
}

func (r *request) RespondJSON(v any, opts ...micro.RespondOpt) error {
	body, err := json.Marshal(v)
	if err != nil {
		return r.fail(micro.ErrMarshalResponse)
	}
	return r.Respond(body, opts...)
}

// Error answers with micro's service error headers and data as the body.
func (r *request) Error(code, description string, data []byte, opts ...micro.RespondOpt) error {
	if code == "" || description == "" {
		return fmt.Errorf("%w: error code and description", micro.ErrArgRequired)
	}
	out := &nats.Msg{Data: data, Header: nats.Header{}}
	for _, opt := range opts {
		opt(out)
	}
	out.Header.Set(HeaderErrorCode, code)
	out.Header.Set(HeaderError, description)
	if err := r.send(out); err != nil {
		return err
	}
	r.fail(fmt.Errorf("%s:%s", code, description))
	return nil
}

func (r *request) Data() []byte { return r.msg.Data }

func (r *request) Headers() micro.Headers { return micro.Headers(r.msg.Header) }

func (r *request) Subject() string { return r.msg.Subject }

func (r *request) Reply() string { return r.msg.Reply }
