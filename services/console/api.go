package console

import (
	"context"
	"encoding/json"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
)

// RequestedBy is what the console sends as the forget's requested-by: the
// audit record says the erasure came through the console.
const RequestedBy = "console"

// readOnlyMessage explains a refused write and how to allow writes.
const readOnlyMessage = "this console is read-only: changing data needs a console started with writes allowed " +
	"(kuma up allows them when the console listens on a loopback address; see docs/console.md)"

// Info is what the pages need to know about the console itself.
type Info struct {
	Context     string `json:"context"`
	Shards      int    `json:"shards"`
	AllowWrites bool   `json:"allow_writes"`
	Node        string `json:"node,omitempty"`
}

func (s *Service) info(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, Info{Context: s.cfg.Context, Shards: s.cfg.Shards, AllowWrites: s.cfg.AllowWrites, Node: s.cfg.NodeName})
}

func (s *Service) status(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.mon.latest(r.Context()))
}

// EntityList is a page of GET /api/entities: the entities projection's rows
// and cursor, and on the first page (no cursor) the number of matches,
// exact up to Config.MaxCount (CountCapped says there are more). The
// projection has no count query: the console pages through the matches,
// and stops there rather than read a million rows for a number.
type EntityList struct {
	kuma.QueryReply
	Count       *int `json:"count,omitempty"`
	CountCapped bool `json:"count_capped,omitempty"`
}

// listEntities pages through the built-in entities projection in id order:
// ?prefix= an id prefix, ?where=FIELD=VALUE (repeatable) a top-level state
// field's value (JSON, or a string when it is not JSON, as kuma query
// --where), ?limit= and ?cursor= the page.
func (s *Service) listEntities(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit, err := intParam(q, "limit", 50, kuma.MaxQueryLimit)
	if err != nil {
		writeError(w, err)
		return
	}
	params := map[string]json.RawMessage{}
	if p := q.Get("prefix"); p != "" {
		params["prefix"], _ = json.Marshal(p)
	}
	if ws := q["where"]; len(ws) > 0 {
		where := map[string]json.RawMessage{}
		for _, kv := range ws {
			name, val, ok := strings.Cut(kv, "=")
			if !ok || name == "" {
				writeError(w, kuma.Errorf(kuma.CodeBadRequest, "where must be FIELD=VALUE, such as role=architect or level=3, got %q", kv))
				return
			}
			if json.Valid([]byte(val)) {
				where[name] = json.RawMessage(val)
			} else {
				where[name], _ = json.Marshal(val)
			}
		}
		params["where"], _ = json.Marshal(where)
	}
	req := &kuma.QueryRequest{Limit: int(limit), Cursor: q.Get("cursor")}
	if len(params) > 0 {
		req.Params = params
	}
	page, err := s.client.Query(r.Context(), "entities", req)
	if err != nil {
		writeError(w, err)
		return
	}
	out := EntityList{QueryReply: *page}
	if req.Cursor == "" {
		n, capped, err := s.countEntities(r.Context(), params, page)
		if err != nil {
			writeError(w, err)
			return
		}
		out.Count, out.CountCapped = &n, capped
	}
	writeJSON(w, http.StatusOK, out)
}

// countEntities counts the matches of params, starting from the first page
// already read, in pages of the largest size, up to Config.MaxCount.
func (s *Service) countEntities(ctx context.Context, params map[string]json.RawMessage, first *kuma.QueryReply) (int, bool, error) {
	size := min(kuma.MaxQueryLimit, s.cfg.MaxCount)
	n, cursor := len(first.Rows), first.NextCursor
	if cursor != "" && len(first.Rows) < size {
		// The first page was small: count from the start in big pages.
		page, err := s.client.Query(ctx, "entities", &kuma.QueryRequest{Limit: size, Params: paramsOrNil(params)})
		if err != nil {
			return 0, false, err
		}
		n, cursor = len(page.Rows), page.NextCursor
	}
	for cursor != "" {
		if n >= s.cfg.MaxCount {
			return n, true, nil
		}
		page, err := s.client.Query(ctx, "entities", &kuma.QueryRequest{Limit: size, Cursor: cursor, Params: paramsOrNil(params)})
		if err != nil {
			return 0, false, err
		}
		n, cursor = n+len(page.Rows), page.NextCursor
	}
	return n, false, nil
}

func paramsOrNil(p map[string]json.RawMessage) map[string]json.RawMessage {
	if len(p) == 0 {
		return nil
	}
	return p
}

// readEntity reads an entity's state now, or with ?at_version=N or
// ?at_time=RFC3339 as it was then.
func (s *Service) readEntity(w http.ResponseWriter, r *http.Request) {
	id, ok := entityID(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	var opts []client.ReadOption
	if q.Get("at_version") != "" {
		n, err := intParam(q, "at_version", 0, 0)
		if err != nil {
			writeError(w, err)
			return
		}
		opts = append(opts, client.AtVersion(n))
	}
	if v := q.Get("at_time"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			writeError(w, kuma.Errorf(kuma.CodeBadRequest, "at_time must be an RFC 3339 time such as 2026-11-25T15:10:05Z, got %q", v))
			return
		}
		opts = append(opts, client.AtTime(t))
	}
	if len(opts) > 1 {
		writeError(w, kuma.Errorf(kuma.CodeBadRequest, "give at most one of at_version and at_time"))
		return
	}
	out, err := s.client.Read(r.Context(), id, opts...)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// history answers one page of the entity's events: ?from=V&limit=N.
func (s *Service) history(w http.ResponseWriter, r *http.Request) {
	id, ok := entityID(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	from, err := intParam(q, "from", 1, 0)
	if err != nil {
		writeError(w, err)
		return
	}
	limit, err := intParam(q, "limit", kuma.DefaultHistoryLimit, kuma.MaxHistoryLimit)
	if err != nil {
		writeError(w, err)
		return
	}
	out, err := s.client.History(r.Context(), id, from, int(limit))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// export answers everything held about the entity as a JSON download.
func (s *Service) export(w http.ResponseWriter, r *http.Request) {
	id, ok := entityID(w, r)
	if !ok {
		return
	}
	out, err := s.client.Export(r.Context(), id)
	if err != nil {
		writeError(w, err)
		return
	}
	// The id is a validated subject token: safe in a header as it is.
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": id + ".json"}))
	writeJSON(w, http.StatusOK, out)
}

// ForgetRequest is the body of POST /api/entities/{id}/forget. Confirm must
// repeat the id: the page asks the operator to type it.
type ForgetRequest struct {
	Confirm string `json:"confirm"`
	Reason  string `json:"reason,omitempty"`
}

func (s *Service) forget(w http.ResponseWriter, r *http.Request) {
	id, ok := entityID(w, r)
	if !ok {
		return
	}
	var req ForgetRequest
	if !readBody(w, r, &req) {
		return
	}
	if req.Confirm != id {
		writeError(w, kuma.Errorf(kuma.CodeBadRequest, "confirm must repeat the entity id %q to forget it", id))
		return
	}
	out, err := s.client.Forget(r.Context(), id, req.Reason, RequestedBy)
	if err != nil {
		writeError(w, err)
		return
	}
	// Not the id: the logs outlive the forget. The keyvault's audit line,
	// at the same forgotten_at, names it by a keyed hash.
	s.cfg.Logger.Info("console: entity forgotten", "forgotten_at", out.ForgottenAt, "events_deleted", out.EventsDeleted)
	writeJSON(w, http.StatusOK, out)
}

func (s *Service) projections(w http.ResponseWriter, r *http.Request) {
	st, err := s.client.Status(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st.Projections)
}

func (s *Service) retry(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	out, err := s.client.RetryProjectionReplicas(r.Context(), name)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// SkipRequest is the body of POST /api/projections/{name}/skip: the
// position the projection stopped at, as the page showed it.
type SkipRequest struct {
	Position string `json:"position"`
}

func (s *Service) skip(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req SkipRequest
	if !readBody(w, r, &req) {
		return
	}
	if req.Position == "" {
		writeError(w, kuma.Errorf(kuma.CodeBadRequest, "position is required: the position of the event the projection stopped at"))
		return
	}
	out, err := s.client.SkipProjectionReplicas(r.Context(), name, req.Position)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Service) rebuild(w http.ResponseWriter, r *http.Request) {
	out, err := s.client.Rebuild(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// writes guards a handler that changes data: refused unless the console
// allows writes, and only from the console's own pages. A cross-site page
// cannot send a JSON body with the console's header without a CORS
// preflight, which the console never grants.
func (s *Service) writes(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.cfg.AllowWrites {
			writeError(w, kuma.Errorf(kuma.CodeForbidden, readOnlyMessage))
			return
		}
		if r.Header.Get(HeaderConsole) != "1" {
			writeError(w, kuma.Errorf(kuma.CodeForbidden, "requests that change data must carry the %s: 1 header (the console's pages send it)", HeaderConsole))
			return
		}
		if o := r.Header.Get("Origin"); o != "" {
			if u, err := url.Parse(o); err != nil || u.Host != r.Host {
				writeError(w, kuma.Errorf(kuma.CodeForbidden, "cross-origin request from %q refused", o))
				return
			}
		}
		h(w, r)
	}
}

// HeaderConsole marks a request sent by the console's own pages.
const HeaderConsole = "Kuma-Console"

// guardHost refuses requests whose Host is not a loopback name when the
// console listens on loopback: a page on another site cannot reach it by
// pointing its own domain name at 127.0.0.1 (DNS rebinding).
func (s *Service) guardHost(h http.Handler) http.Handler {
	host, _, _ := net.SplitHostPort(s.cfg.Listen)
	if !natsbus.LoopbackHost(host) {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := r.Host
		if hn, _, err := net.SplitHostPort(r.Host); err == nil {
			name = hn
		}
		if !natsbus.LoopbackHost(name) {
			writeError(w, kuma.Errorf(kuma.CodeForbidden, "host %q refused: this console listens on loopback; open it as http://localhost or http://127.0.0.1", r.Host))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// entityID returns the path's entity id, or answers 400 when it breaks the
// naming rule.
func entityID(w http.ResponseWriter, r *http.Request) (string, bool) {
	id := r.PathValue("id")
	if err := kuma.ValidateEntityID(id); err != nil {
		writeError(w, err)
		return "", false
	}
	return id, true
}

// readBody decodes a small JSON body strictly; an empty body is the zero
// value.
func readBody(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<10))
	if err != nil {
		writeError(w, kuma.Errorf(kuma.CodeBadRequest, "read body: %v", err))
		return false
	}
	if err := kuma.Decode(body, v); err != nil {
		writeError(w, err)
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// writeError answers a protocol error with its HTTP status and the
// protocol's error body, {"error": {"code", "message", "details"}}.
func writeError(w http.ResponseWriter, err error) {
	e := kuma.AsError(err)
	writeJSON(w, e.Code.Status(), kuma.ErrorReply{Error: e})
}

// intParam reads a query parameter that must be a whole number from 1 to max
// (no upper bound when max is 0), or def when it is absent.
func intParam(q url.Values, name string, def, max int64) (int64, error) {
	v := q.Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	switch {
	case err != nil || n < 1:
		return 0, kuma.Errorf(kuma.CodeBadRequest, "%s must be a whole number, 1 or more, got %q", name, v)
	case max > 0 && n > max:
		return 0, kuma.Errorf(kuma.CodeBadRequest, "%s must be 1 to %d, got %q", name, max, v)
	}
	return n, nil
}
