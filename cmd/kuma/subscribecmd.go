package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// cmdSubscribe follows the context's feed: every event as one JSON line on
// stdout, catch-up first and then live, until Ctrl-C (or, with
// --catch-up-only, until it has caught up). The cursor to resume from goes
// to stderr when it stops, and after every page to --cursor-file.
func cmdSubscribe(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("subscribe", stderr)
	conn := connectFlags(fs, "give up on one page request after this long")
	var types []string
	var (
		after      = fs.String("after", "", "resume after this cursor (a next printed earlier, or the content of --cursor-file)")
		fromStart  = fs.Bool("from-start", false, "start from the first event (the default without --after)")
		fromEnd    = fs.Bool("from-end", false, "start at the current end: only events committed from now on")
		prefix     = fs.String("prefix", "", "only entities whose id starts with this")
		limit      = fs.Int("limit", kuma.DefaultFeedLimit, "events per page")
		wait       = fs.Duration("wait", 10*time.Second, "how long one request waits for new events")
		cursorFile = fs.String("cursor-file", "", "keep the cursor in this file after every page, and start from it when it exists")
		catchUp    = fs.Bool("catch-up-only", false, "stop once every event committed so far was printed")
	)
	fs.Var((*listFlag)(&types), "type", "only events of this type (repeat it, or separate types by commas)")
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	if len(pos) != 0 {
		return usageError{fmt.Errorf("subscribe takes no arguments; see kuma subscribe --help")}
	}
	starts := 0
	for _, set := range []bool{*after != "", *fromStart, *fromEnd} {
		if set {
			starts++
		}
	}
	if starts > 1 {
		return usageError{errors.New("give one of --after, --from-start and --from-end")}
	}
	cursor := *after
	if *fromEnd {
		cursor = kuma.FeedEnd
	}
	if *cursorFile != "" && starts == 0 {
		switch b, err := os.ReadFile(*cursorFile); {
		case err == nil:
			cursor = strings.TrimSpace(string(b))
		case !errors.Is(err, os.ErrNotExist):
			return err
		}
	}
	c, closeConn, err := conn.client()
	if err != nil {
		return err
	}
	defer closeConn()

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	enc := json.NewEncoder(stdout)
	opts := client.FollowOptions{After: cursor, Prefix: *prefix, Types: types, Limit: *limit, Wait: *wait}
	last := cursor
	opts.Checkpoint = func(next string) error {
		last = next
		if *cursorFile != "" {
			if err := writeCursor(*cursorFile, next); err != nil {
				return err
			}
		}
		return nil
	}
	var n int
	handle := func(e kuma.FeedEvent) error {
		n++
		return enc.Encode(e)
	}
	if *catchUp {
		// Page by page, to see the empty page that ends the catch-up.
		for {
			page, err := c.Feed(ctx, kuma.FeedRequest{After: last, Limit: *limit, Prefix: *prefix, Types: types})
			if err != nil {
				return reportFollow(stderr, last, n, err)
			}
			for _, e := range page.Events {
				if err := handle(e); err != nil {
					return err
				}
			}
			moved := page.Next != last
			if moved {
				if err := opts.Checkpoint(page.Next); err != nil {
					return err
				}
			}
			if len(page.Events) == 0 && !moved {
				return reportFollow(stderr, last, n, nil) // caught up
			}
		}
	}
	_, err = c.Follow(ctx, opts, handle)
	return reportFollow(stderr, last, n, err)
}

// reportFollow says how to resume; a stop asked for (Ctrl-C, caught up) is
// not an error.
func reportFollow(stderr io.Writer, cursor string, n int, err error) error {
	fmt.Fprintf(stderr, "kuma subscribe: %d events; resume with --after %s\n", n, cursor)
	switch {
	case err == nil, errors.Is(err, context.Canceled):
		return nil
	}
	var kerr *kuma.Error
	if errors.As(err, &kerr) {
		b, _ := json.Marshal(kuma.ErrorReply{Error: kerr})
		fmt.Fprintln(stderr, string(b))
		return exitError{1}
	}
	return err
}

// writeCursor replaces the cursor file atomically: a crash leaves the old
// checkpoint or the new one, never half of one.
func writeCursor(path, cursor string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".cursor-*")
	if err != nil {
		return err
	}
	if _, err := tmp.WriteString(cursor + "\n"); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}
