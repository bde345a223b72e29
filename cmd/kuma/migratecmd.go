package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// migratePoll is how often `kuma migrate` looks at status while it waits.
const migratePoll = 100 * time.Millisecond

// cmdMigrate runs `kuma migrate --shard N --to NODE` (pin the shard to a
// node, which moves it there) and `kuma migrate --shard N --unpin`. Unless
// --wait is 0 it then follows status until the shard is on its node and
// still. It prints the reply, with the final owner and epoch, as JSON on
// stdout and how long the move took on stderr.
func cmdMigrate(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("migrate", stderr)
	conn := connectFlags(fs, "give up on a request after this long")
	var (
		shard = fs.Int("shard", -1, "the shard to move (0 to the context's shards - 1; kuma status lists them)")
		to    = fs.String("to", "", "the node to move it to: a live, non-draining member (kuma status lists them)")
		unpin = fs.Bool("unpin", false, "remove the shard's pin instead: it goes back to where rendezvous hashing puts it")
		wait  = fs.Duration("wait", 30*time.Second, "wait this long for the move to finish (0: return once the pin is set)")
	)
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	switch {
	case len(pos) != 0:
		return usageError{fmt.Errorf("unexpected argument %q; want --shard N --to NODE (or --unpin)", pos[0])}
	case *shard < 0:
		return usageError{errors.New("--shard N is required (0 or more)")}
	case (*to == "") == !*unpin:
		return usageError{errors.New("give either --to NODE or --unpin")}
	case *wait < 0:
		return usageError{fmt.Errorf("--wait %s: want 0 or more", *wait)}
	}
	c, closeConn, err := conn.client()
	if err != nil {
		return err
	}
	defer closeConn()
	rctx, cancel := context.WithTimeout(ctx, *conn.timeout)
	var rep *kuma.MigrateReply
	if *unpin {
		rep, err = c.Unpin(rctx, *shard)
	} else {
		rep, err = c.Migrate(rctx, *shard, *to)
	}
	cancel()
	if err != nil || *wait == 0 {
		return printReply(rep, err, stdout, stderr)
	}
	if err := followMigrate(ctx, c, rep, *unpin, *wait, stderr); err != nil {
		return err
	}
	return printReply(rep, nil, stdout, stderr)
}

// followMigrate polls status until the shard is owned by its target (the
// pinned node, or after an unpin the node status says it should live on)
// and nothing is moving it; rep gets the final owner and epoch.
func followMigrate(ctx context.Context, c *client.Client, rep *kuma.MigrateReply, unpin bool, wait time.Duration, w io.Writer) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	tick := time.NewTicker(migratePoll)
	defer tick.Stop()
	var last *kuma.ShardStatus
	var lastErr error
	for {
		st, err := c.Status(ctx)
		if err == nil {
			for i := range st.Shards {
				if st.Shards[i].Shard == rep.Shard {
					last = &st.Shards[i]
				}
			}
			if last == nil {
				return fmt.Errorf("status does not list shard %d", rep.Shard)
			}
			target := rep.To
			if unpin {
				target = last.Desired
			}
			if target != "" && last.Owner == target && last.Moving == "" && last.Error == "" {
				if last.Epoch == rep.Epoch && rep.Owner == target {
					fmt.Fprintf(w, "shard %d was already on %s (epoch %d)\n", rep.Shard, target, last.Epoch)
				} else {
					fmt.Fprintf(w, "shard %d moved from %s to %s in %s (epoch %d → %d)\n",
						rep.Shard, orNobody(rep.Owner), target, time.Since(start).Round(time.Millisecond), rep.Epoch, last.Epoch)
				}
				rep.To, rep.Owner, rep.Epoch = target, last.Owner, last.Epoch
				return nil
			}
		} else {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.Canceled) {
				return ctx.Err()
			}
			what := "the pin stays, so the shard moves when it can (kuma status shows it)"
			if unpin {
				what = "the pin is gone; the shard moves when it can (kuma status shows it)"
			}
			switch {
			case last != nil:
				still := ""
				if last.Moving != "" {
					still = ", " + last.Moving
				}
				return fmt.Errorf("shard %d is still on %s (epoch %d%s) after %s; %s",
					rep.Shard, orNobody(last.Owner), last.Epoch, still, wait, what)
			default:
				return fmt.Errorf("no status of shard %d within %s (%v); %s", rep.Shard, wait, lastErr, what)
			}
		case <-tick.C:
		}
	}
}

func orNobody(node string) string {
	if node == "" {
		return "no node"
	}
	return node
}
