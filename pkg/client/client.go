// Package client is the Go client of Kuma's NATS protocol (PROTOCOL.md).
//
// Errors are *kuma.Error values: test them with errors.Is(err,
// kuma.ErrVersionConflict) or errors.As(err, &kerr). Requests that failed
// because no shard owner answered (no responders, or unavailable while a
// shard moves) are retried with backoff, with the same idempotency key, until
// the context's deadline. A Client is safe for concurrent use.
package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/placement"
	"github.com/kumadb/kuma/pkg/telemetry"
	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Options configure a Client. The zero value is usable.
type Options struct {
	// Context is the Kuma context to talk to (default "default").
	Context string
	// Timeout bounds a call whose ctx has no deadline (default 10s).
	Timeout time.Duration
	// DirectShards, when set to the context's shard count, makes the client
	// hash entities itself and send to the shard subject, skipping the
	// router hop. It must equal the server's count; a shardnode refuses an
	// entity sent to the wrong shard.
	DirectShards int
	// NoAutoIdempotencyKey stops the client from giving each append without
	// a key a random one. Without a key, an append whose reply was lost
	// cannot be retried safely.
	NoAutoIdempotencyKey bool
	// MaxBackoff caps the wait between retries (default 1s).
	MaxBackoff time.Duration
	// TracerProvider traces each call and carries its context to the server
	// in the traceparent header (nil: no tracing).
	TracerProvider trace.TracerProvider
}

// Client talks to Kuma over one NATS connection.
type Client struct {
	nc     *nats.Conn
	opts   Options
	tracer trace.Tracer
}

// New returns a client over nc, which the caller owns and closes.
func New(nc *nats.Conn, opts Options) (*Client, error) {
	if nc == nil {
		return nil, errors.New("client: a NATS connection is required")
	}
	if opts.Context == "" {
		opts.Context = kuma.DefaultContext
	}
	if err := kuma.ValidateContext(opts.Context); err != nil {
		return nil, err
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = time.Second
	}
	if opts.DirectShards < 0 {
		return nil, fmt.Errorf("client: DirectShards must be 0 or more, got %d", opts.DirectShards)
	}
	return &Client{nc: nc, opts: opts, tracer: telemetry.Tracer(opts.TracerProvider)}, nil
}

// AppendOption changes one append.
type AppendOption func(*kuma.AppendRequest)

// ExpectVersion makes the append fail with version_conflict unless the
// entity is at version v (0: the entity must not exist yet).
func ExpectVersion(v int64) AppendOption {
	return func(r *kuma.AppendRequest) { r.ExpectedVersion = &v }
}

// IdempotencyKey sets the append's idempotency key.
func IdempotencyKey(key string) AppendOption {
	return func(r *kuma.AppendRequest) { r.IdempotencyKey = key }
}

// Append appends events to entity atomically and returns once they are
// durable.
func (c *Client) Append(ctx context.Context, entity string, events []kuma.EventInput, opts ...AppendOption) (*kuma.AppendReply, error) {
	req := kuma.AppendRequest{Events: events}
	for _, o := range opts {
		o(&req)
	}
	if req.IdempotencyKey == "" && !c.opts.NoAutoIdempotencyKey {
		req.IdempotencyKey = newKey()
	}
	var out kuma.AppendReply
	if err := c.call(ctx, kuma.OpAppend, entity, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// ReadOption changes one read.
type ReadOption func(*kuma.ReadRequest)

// AtVersion reads the state as it was at version v.
func AtVersion(v int64) ReadOption { return func(r *kuma.ReadRequest) { r.AtVersion = &v } }

// AtTime reads the state as it was at time t.
func AtTime(t time.Time) ReadOption { return func(r *kuma.ReadRequest) { r.AtTime = &t } }

// Read returns the entity's state: now, or at a version or time.
func (c *Client) Read(ctx context.Context, entity string, opts ...ReadOption) (*kuma.ReadReply, error) {
	var req kuma.ReadRequest
	for _, o := range opts {
		o(&req)
	}
	var out kuma.ReadReply
	if err := c.call(ctx, kuma.OpRead, entity, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// History returns up to limit events from fromVersion (0: defaults of 1 and
// 100). The server cuts a page by size as well as by count, so that it fits
// in one NATS message; History follows next_version until it has limit
// events or the entity's last, and NextVersion says where the next call
// starts (nil at the end). Its calls are not one snapshot: an append
// between them shows in the later pages.
func (c *Client) History(ctx context.Context, entity string, fromVersion int64, limit int) (*kuma.HistoryReply, error) {
	if limit <= 0 {
		limit = kuma.DefaultHistoryLimit
	}
	var out *kuma.HistoryReply
	for {
		var page kuma.HistoryReply
		req := kuma.HistoryRequest{FromVersion: fromVersion, Limit: limit}
		if out != nil {
			req.Limit = limit - len(out.Events)
		}
		if err := c.call(ctx, kuma.OpHistory, entity, req, &page); err != nil {
			return nil, err
		}
		if out == nil {
			out = &page
		} else {
			out.Events = append(out.Events, page.Events...)
			out.NextVersion = page.NextVersion
		}
		// A page with no event cannot move on (the server always sends
		// one that fits); stop rather than ask the same again.
		if out.NextVersion == nil || len(out.Events) >= limit || len(page.Events) == 0 {
			return out, nil
		}
		fromVersion = *out.NextVersion
	}
}

// Export returns everything Kuma holds about the entity.
func (c *Client) Export(ctx context.Context, entity string) (*kuma.ExportReply, error) {
	var out kuma.ExportReply
	if err := c.call(ctx, kuma.OpExport, entity, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Forget erases the entity (right to erasure): its key is shredded and its
// events, snapshots and idempotency keys are deleted; afterwards every
// operation on the id answers entity_forgotten. Forgetting again returns the
// same reply. requestedBy is recorded in the audit log (no personal data).
func (c *Client) Forget(ctx context.Context, entity, reason, requestedBy string) (*kuma.ForgetReply, error) {
	var out kuma.ForgetReply
	hdr := nats.Header{}
	if requestedBy != "" {
		hdr.Set(kuma.HeaderRequestedBy, requestedBy)
	}
	if err := c.callWithHeader(ctx, kuma.OpForget, entity, kuma.ForgetRequest{Reason: reason}, hdr, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Query asks a projection (the built-in "entities" or a declared one). With
// r.After (an append's position) it answers once the projection has applied
// that position: read-your-writes.
func (c *Client) Query(ctx context.Context, projection string, r *kuma.QueryRequest) (*kuma.QueryReply, error) {
	if _, ok := ctx.Deadline(); !ok && r.After != "" {
		wait := kuma.DefaultQueryWait
		if r.WaitMS != nil {
			wait = *r.WaitMS
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.Timeout+time.Duration(wait)*time.Millisecond)
		defer cancel()
	}
	var out kuma.QueryReply
	err := c.request(ctx, "query", projection, kuma.QuerySubject(c.opts.Context, projection), r, nil, &out,
		attribute.String("kuma.context", c.opts.Context), attribute.String("kuma.projection", projection))
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// Rebuild starts rebuilding a projection beside its live copy; Status shows
// the progress.
func (c *Client) Rebuild(ctx context.Context, projection string) (*kuma.RebuildReply, error) {
	var out kuma.RebuildReply
	if err := c.request(ctx, "rebuild", projection, kuma.ProjectionAdminSubject(c.opts.Context, "rebuild", projection), nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// RetryProjection makes a projection stopped at a failed event try it again
// (on every projector replica stopped there).
func (c *Client) RetryProjection(ctx context.Context, projection string) error {
	_, err := c.RetryProjectionReplicas(ctx, projection)
	return err
}

// RetryProjectionReplicas is RetryProjection with its reply, which says
// which projector replicas retried, which refused and which did not answer.
func (c *Client) RetryProjectionReplicas(ctx context.Context, projection string) (*kuma.ProjectionActReply, error) {
	var out kuma.ProjectionActReply
	if err := c.request(ctx, "retry", projection, kuma.ProjectionAdminSubject(c.opts.Context, "retry", projection), nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// DropProjection removes, on every projector replica, what a projection
// that is no longer declared left behind: its read model files, its
// catalog entry and its durable consumers. A declared projection, or the
// built-in entities, is refused with bad_request; a name nothing is left of
// answers not_found. The reply says what each replica removed.
func (c *Client) DropProjection(ctx context.Context, projection string) (*kuma.ProjectionActReply, error) {
	var out kuma.ProjectionActReply
	if err := c.request(ctx, "drop", projection, kuma.ProjectionAdminSubject(c.opts.Context, "drop", projection), nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// SkipProjection makes a projection stopped at the event at position skip
// it (recorded, and counted in status), on every projector replica stopped
// there.
func (c *Client) SkipProjection(ctx context.Context, projection, position string) error {
	_, err := c.SkipProjectionReplicas(ctx, projection, position)
	return err
}

// SkipProjectionReplicas is SkipProjection with its reply, which says which
// projector replicas skipped the event.
func (c *Client) SkipProjectionReplicas(ctx context.Context, projection, position string) (*kuma.ProjectionActReply, error) {
	var out kuma.ProjectionActReply
	if err := c.request(ctx, "skip", projection, kuma.ProjectionAdminSubject(c.opts.Context, "skip", projection),
		kuma.SkipRequest{Position: position}, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Status returns the context's shard map and projections.
func (c *Client) Status(ctx context.Context) (*kuma.StatusReply, error) {
	var out kuma.StatusReply
	if err := c.request(ctx, "status", c.opts.Context, kuma.StatusSubject(c.opts.Context), nil, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *Client) subject(op, entity string) string {
	if n := c.opts.DirectShards; n > 0 {
		return kuma.ShardSubject(c.opts.Context, placement.ShardOf(entity, n), op, entity)
	}
	return kuma.EntitySubject(c.opts.Context, op, entity)
}

// call sends one request, retrying while no shard owner is there to answer.
func (c *Client) call(ctx context.Context, op, entity string, req any, out any) error {
	return c.callWithHeader(ctx, op, entity, req, nil, out)
}

func (c *Client) callWithHeader(ctx context.Context, op, entity string, req any, hdr nats.Header, out any) (err error) {
	if err := kuma.ValidateEntityID(entity); err != nil {
		return err
	}
	return c.request(ctx, op, entity, c.subject(op, entity), req, hdr, out,
		attribute.String("kuma.context", c.opts.Context), attribute.String("kuma.entity", entity))
}

// request sends one request to subject, retrying while nothing is there to
// answer (no responders or unavailable), and decodes the reply into out.
// what names the request in errors.
func (c *Client) request(ctx context.Context, op, what, subject string, req any, hdr nats.Header, out any, attrs ...attribute.KeyValue) (err error) {
	ctx, span := c.tracer.Start(ctx, "kuma "+op, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...))
	defer func() {
		if err != nil {
			span.SetStatus(codes.Error, string(kuma.ErrorCode(err)))
		}
		span.End()
	}()
	if span.SpanContext().IsValid() {
		if hdr == nil {
			hdr = nats.Header{}
		}
		telemetry.Inject(ctx, hdr)
	}
	var body []byte
	if req != nil {
		var err error
		if body, err = json.Marshal(req); err != nil {
			return kuma.Errorf(kuma.CodeBadRequest, "encode request: %v", err)
		}
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.Timeout)
		defer cancel()
	}
	backoff := 20 * time.Millisecond
	var lastRetry error // why the previous attempt is being retried
	for {
		msg, err := c.nc.RequestMsgWithContext(ctx, &nats.Msg{Subject: subject, Data: body, Header: hdr})
		var retry error
		switch {
		case err == nil:
			rerr := natsbus.ReplyError(msg)
			if rerr == nil {
				if err := json.Unmarshal(msg.Data, out); err != nil {
					return kuma.Errorf(kuma.CodeInternal, "decode %s reply: %v", op, err)
				}
				return nil
			}
			if !errors.Is(rerr, kuma.ErrUnavailable) {
				return rerr
			}
			retry = rerr
		case natsbus.IsNoResponders(err):
			retry = kuma.Errorf(kuma.CodeUnavailable, "no service answered %s", subject)
		case errors.Is(err, context.DeadlineExceeded) && lastRetry != nil:
			// The deadline came during a retry of nothing answering (or
			// unavailable): that is the answer, not a lost reply. The
			// retry is safe either way (the same idempotency key).
			return lastRetry
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
			return kuma.Errorf(kuma.CodeTimeout, "%s %s: no reply in time; retry (appends with the same idempotency key)", op, what)
		case errors.Is(err, context.Canceled):
			return err
		case errors.Is(err, nats.ErrMaxPayload):
			return kuma.Errorf(kuma.CodePayloadTooLarge, "request is over the server's message limit of %d bytes", c.nc.MaxPayload())
		default:
			return kuma.Errorf(kuma.CodeUnavailable, "%s %s: %v", op, what, err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return retry
			}
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(backoff*2, c.opts.MaxBackoff)
		lastRetry = retry
	}
}

func newKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "auto-" + hex.EncodeToString(b[:])
}
