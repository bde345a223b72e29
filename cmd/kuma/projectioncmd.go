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

// cmdProjection runs query, projection rebuild|retry|skip and status.
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
			return usageError{errors.New("want rebuild, retry or skip; see kuma --help")}
		}
		op, pos = pos[0], pos[1:]
	}
	want := map[string]int{"query": 1, "rebuild": 1, "retry": 1, "skip": 2, "status": 0}
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
		err = c.RetryProjection(ctx, pos[0])
		out = map[string]any{"projection": pos[0], "retrying": true}
	case "skip":
		err = c.SkipProjection(ctx, pos[0], pos[1])
		out = map[string]any{"projection": pos[0], "skipped": pos[1]}
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

// followRebuild draws the rebuild's progress until the new copy is live or
// stops at a failed event.
func followRebuild(ctx context.Context, c *client.Client, name string, rr *kuma.RebuildReply, w io.Writer) error {
	if !rr.Started {
		fmt.Fprintf(w, "a rebuild of %s (generation %d) was already running; following it\n", name, rr.Generation)
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
		switch {
		case p == nil:
			return fmt.Errorf("status does not list projection %q", name)
		case p.Rebuild == nil && p.Generation >= rr.Generation:
			fmt.Fprintf(w, "\r%s 100%%  rebuilt: generation %d is live (%s)\n", bar(1), p.Generation, time.Since(start).Round(time.Millisecond))
			return nil
		case p.Rebuild != nil && p.Rebuild.State == "stopped":
			fmt.Fprintln(w)
			return fmt.Errorf("the rebuild stopped at %s: %s; the live copy keeps answering (kuma projection retry|skip %s)",
				p.Rebuild.Error.Position, p.Rebuild.Error.Message, name)
		case p.Rebuild != nil:
			fmt.Fprintf(w, "\r%s %3.0f%%  %d/%d messages", bar(p.Rebuild.Progress), p.Rebuild.Progress*100, p.Rebuild.Applied, p.Rebuild.Target)
		}
		select {
		case <-ctx.Done():
			fmt.Fprintln(w)
			return fmt.Errorf("stopped following; the rebuild goes on (kuma status shows it): %w", ctx.Err())
		case <-tick.C:
		}
	}
}

func bar(f float64) string {
	const width = 30
	n := int(f * width)
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}
