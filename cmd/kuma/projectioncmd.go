package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// keyJSON collects repeated K=JSON flags; a value that is not JSON is taken
// as a string, so --param account=acct-1 works without quotes.
type keyJSON map[string]json.RawMessage

func (k keyJSON) String() string { return "" }

func (k keyJSON) Set(v string) error {
	name, val, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", v)
	}
	if json.Valid([]byte(val)) {
		k[name] = json.RawMessage(val)
	} else {
		b, _ := json.Marshal(val)
		k[name] = b
	}
	return nil
}

// cmdProjection runs query, projection rebuild|retry|skip|drop and status.
func cmdProjection(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet(cmd, stderr)
	conn := connectFlags(fs, "give up on a request after this long")
	params, where := keyJSON{}, keyJSON{}
	var (
		query  = fs.String("query", "", "query: the named query of a declared projection")
		prefix = fs.String("prefix", "", "query entities: entity id prefix")
		after  = fs.String("after", "", "query: wait until the projection has applied this position (read-your-writes)")
		waitMS = fs.Int("wait-ms", kuma.DefaultQueryWait, "query: how long to wait for --after")
		limit  = fs.Int("limit", 0, "query: rows per page")
		cursor = fs.String("cursor", "", "query: next_cursor of the previous page")
		noWait = fs.Bool("no-wait", false, "projection rebuild: return once started, without the progress bar")
	)
	fs.Var(params, "param", "query: a parameter NAME=VALUE (repeatable; VALUE is JSON or a string)")
	fs.Var(where, "where", "query entities: a state field NAME=VALUE to match (repeatable)")
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	op := cmd
	if cmd == "projection" {
		if len(pos) == 0 {
			return usageError{errors.New("want rebuild, retry, skip or drop; see kuma --help")}
		}
		op, pos = pos[0], pos[1:]
	}
	want := map[string]int{"query": 1, "rebuild": 1, "retry": 1, "skip": 2, "drop": 1, "status": 0}
	n, ok := want[op]
	if !ok || len(pos) != n {
		return usageError{fmt.Errorf("wrong arguments for %s; see kuma --help", op)}
	}
	c, closeConn, err := conn.client()
	if err != nil {
		return err
	}
	defer closeConn()
	var out any
	switch op {
	case "query":
		r := &kuma.QueryRequest{Query: *query, Limit: *limit, Cursor: *cursor, After: *after}
		if *after != "" {
			r.WaitMS = waitMS
		}
		if len(params) > 0 {
			r.Params = params
		}
		if len(where) > 0 || *prefix != "" {
			if r.Params == nil {
				r.Params = map[string]json.RawMessage{}
			}
			if len(where) > 0 {
				b, _ := json.Marshal(map[string]json.RawMessage(where))
				r.Params["where"] = b
			}
			if *prefix != "" {
				b, _ := json.Marshal(*prefix)
				r.Params["prefix"] = b
			}
		}
		out, err = c.Query(ctx, pos[0], r)
	case "rebuild":
		var rr *kuma.RebuildReply
		rr, err = c.Rebuild(ctx, pos[0])
		if err == nil && !*noWait {
			return followRebuild(ctx, c, pos[0], rr, stderr)
		}
		out = rr
	case "retry":
		out, err = c.RetryProjectionReplicas(ctx, pos[0])
	case "skip":
		out, err = c.SkipProjectionReplicas(ctx, pos[0], pos[1])
	case "drop":
		out, err = c.DropProjection(ctx, pos[0])
	case "status":
		out, err = c.Status(ctx)
	}
	return printReply(out, err, stdout, stderr)
}

// printReply prints a reply as indented JSON, or a protocol error as
// {"error": ...} on stderr with exit status 1.
func printReply(out any, err error, stdout, stderr io.Writer) error {
	if err != nil {
		var kerr *kuma.Error
		if errors.As(err, &kerr) {
			b, _ := json.MarshalIndent(kuma.ErrorReply{Error: kerr}, "", "  ")
			fmt.Fprintln(stderr, string(b))
			return exitError{code: 1}
		}
		return err
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(stdout, string(b))
	return err
}

// followRebuild draws the rebuild's progress until the new copy is live on
// every projector replica that started it, or stops at a failed event.
func followRebuild(ctx context.Context, c *client.Client, name string, rr *kuma.RebuildReply, w io.Writer) error {
	if !rr.Started {
		fmt.Fprintf(w, "a rebuild of %s (generation %d) was already running; following it\n", name, rr.Generation)
	}
	if len(rr.Missing) > 0 {
		fmt.Fprintf(w, "projector replicas %s did not answer; they rebuild nothing\n", strings.Join(rr.Missing, ", "))
	}
	for _, r := range rr.Replicas {
		if r.Error != nil {
			fmt.Fprintf(w, "projector replica %s refused: %s\n", r.Node, r.Error)
		}
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	for {
		st, err := c.Status(ctx)
		if err != nil {
			return err
		}
		var p *kuma.ProjectionStatus
		for i := range st.Projections {
			if st.Projections[i].Name == name {
				p = &st.Projections[i]
			}
		}
		if p == nil {
			return fmt.Errorf("status does not list projection %q", name)
		}
		r := rebuildProgress(p, rr)
		switch {
		case r.done:
			fmt.Fprintf(w, "\r%s 100%%  rebuilt: generation %d is live%s (%s)\n", bar(1), r.generation, r.on, time.Since(start).Round(time.Millisecond))
			return nil
		case r.stopped != nil:
			fmt.Fprintln(w)
			return fmt.Errorf("the rebuild stopped%s at %s: %s; the live copy keeps answering (kuma projection retry|skip %s)",
				r.on, r.stopped.Error.Position, r.stopped.Error.Message, name)
		case r.least != nil:
			fmt.Fprintf(w, "\r%s %3.0f%%  %d/%d messages%s", bar(r.least.Progress), r.least.Progress*100, r.least.Applied, r.least.Target, r.on)
		}
		select {
		case <-ctx.Done():
			fmt.Fprintln(w)
			return fmt.Errorf("stopped following; the rebuild goes on (kuma status shows it): %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// progress is where a rebuild stands over the replicas that started it:
// done on all, stopped on one, or the least advanced one's progress. on
// names the replica concerned (empty with a single projector).
type progress struct {
	done       bool
	generation int64
	stopped    *kuma.RebuildStatus
	least      *kuma.RebuildStatus
	on         string
}

func rebuildProgress(p *kuma.ProjectionStatus, rr *kuma.RebuildReply) progress {
	// A projector older than replicas, or a status without them: the
	// projection's own fields are its one replica's.
	replicas, gens := p.Replicas, map[string]int64{}
	if len(replicas) == 0 || len(rr.Replicas) == 0 {
		replicas, gens = []kuma.ProjectionStatus{*p}, map[string]int64{p.Node: rr.Generation}
	} else {
		for _, r := range rr.Replicas {
			if r.Applied {
				gens[r.Node] = r.Generation
			}
		}
	}
	out := progress{done: true}
	for i := range replicas {
		r := &replicas[i]
		gen, ok := gens[r.Node]
		if !ok {
			continue // it did not start this rebuild
		}
		on := ""
		if len(gens) > 1 {
			on = " on " + r.Node
		}
		switch {
		case r.State == "unavailable":
			// Gone since: what it built is unknown, and waiting for it
			// would wait forever.
		case r.Rebuild == nil && r.Generation >= gen:
			out.generation = max(out.generation, r.Generation)
		case r.Rebuild != nil && r.Rebuild.State == "stopped":
			out.done, out.stopped, out.on = false, r.Rebuild, on
			return out
		default:
			out.done = false
			if r.Rebuild != nil && (out.least == nil || r.Rebuild.Progress < out.least.Progress) {
				out.least, out.on = r.Rebuild, on
			}
		}
	}
	if out.done && len(gens) > 1 {
		out.on = fmt.Sprintf(" on %d replicas", len(gens))
	}
	return out
}

func bar(f float64) string {
	const width = 30
	n := int(f * width)
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}
