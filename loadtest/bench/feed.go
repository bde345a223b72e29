package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// followers are live feed followers (--followers) running while the load
// appends: each follows kuma.<ctx>.feed from the end and measures how long
// after its commit each event reached it. Raw ones (--follower-mode raw) do
// not decode the events, only count them and take the cursor, so that what
// the run measures is the node's cost of serving them, not this process's
// cost of decoding 100 copies of every event on the same cores.
type followers struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	events atomic.Int64
	errs   atomic.Int64
	mu     sync.Mutex
	lags   []time.Duration
}

// FollowResult is what the followers saw.
type FollowResult struct {
	Followers int         `json:"followers"`
	Mode      string      `json:"mode"` // decode or raw
	Events    int64       `json:"events"`
	Errors    int64       `json:"errors"`
	Lag       percentiles `json:"lag"` // commit to delivery; not measured by raw followers
}

const (
	followDecode = "decode"
	followRaw    = "raw"
)

func startFollowers(ctx context.Context, n int, mode, url, kctx string) (*followers, error) {
	f := &followers{}
	ctx, f.cancel = context.WithCancel(ctx)
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, err
	}
	c, err := client.New(nc, client.Options{Context: kctx})
	if err != nil {
		nc.Close()
		return nil, err
	}
	// Every follower starts at the current end, so each sees the run's
	// events once.
	end, err := c.Feed(ctx, kuma.FeedRequest{After: kuma.FeedEnd})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("feed end: %w", err)
	}
	for i := 0; i < n; i++ {
		f.wg.Add(1)
		if mode == followRaw {
			go func() {
				defer f.wg.Done()
				if err := f.followRaw(ctx, nc, kctx, end.Next); err != nil && !errors.Is(err, context.Canceled) {
					f.errs.Add(1)
				}
			}()
			continue
		}
		go func() {
			defer f.wg.Done()
			var lags []time.Duration
			_, err := c.Follow(ctx, client.FollowOptions{After: end.Next, Limit: kuma.MaxFeedLimit, Wait: 5 * time.Second}, func(e kuma.FeedEvent) error {
				f.events.Add(1)
				if len(lags) < 200_000 {
					lags = append(lags, time.Since(e.Time))
				}
				return nil
			})
			if err != nil && !errors.Is(err, context.Canceled) {
				f.errs.Add(1)
			}
			f.mu.Lock()
			f.lags = append(f.lags, lags...)
			f.mu.Unlock()
		}()
	}
	go func() { f.wg.Wait(); nc.Close() }()
	return f, nil
}

// followRaw follows the feed over raw NATS requests without decoding the
// events: it counts them (countFeedEvents) and takes the cursor from the end
// of the reply (feedNext). Unavailable and timeouts are retried, as
// client.Follow does.
func (f *followers) followRaw(ctx context.Context, nc *nats.Conn, kctx, cursor string) error {
	subject := kuma.FeedSubject(kctx)
	wait := 5 * time.Second
	for {
		body, _ := json.Marshal(kuma.FeedRequest{After: cursor, Limit: kuma.MaxFeedLimit, WaitMS: int(wait / time.Millisecond)})
		rctx, cancel := context.WithTimeout(ctx, wait+30*time.Second)
		msg, err := nc.RequestWithContext(rctx, subject, body)
		cancel()
		if err == nil {
			err = natsbus.ReplyError(msg)
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, kuma.ErrUnavailable) || errors.Is(err, kuma.ErrTimeout) ||
				errors.Is(err, context.DeadlineExceeded) || natsbus.IsNoResponders(err) {
				time.Sleep(20 * time.Millisecond)
				continue
			}
			return err
		}
		next, ok := feedNext(msg.Data)
		if !ok {
			return fmt.Errorf("feed reply without next: %.200s", msg.Data)
		}
		f.events.Add(int64(countFeedEvents(msg.Data)))
		cursor = next
	}
}

// countFeedEvents counts the events of a feed reply without decoding it:
// every event has exactly one "position" key, and the router writes the
// reply compact (no space before the colon). It would overcount events
// whose own data holds a "position" key; the load's data has none.
func countFeedEvents(reply []byte) int {
	return bytes.Count(reply, []byte(`"position":`))
}

// feedNext takes the cursor from a feed reply without decoding it: "next"
// is the last key (the router writes {"events":[...],"next":"..."}), and a
// cursor is base64url after its prefix, so it holds no escapes.
func feedNext(reply []byte) (string, bool) {
	i := bytes.LastIndex(reply, []byte(`"next":"`))
	if i < 0 {
		return "", false
	}
	rest := reply[i+len(`"next":"`):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return "", false
	}
	return string(rest[:j]), true
}

// stop waits until every follower has seen want events each (or limit
// passed), stops them and returns what they saw.
func (f *followers) stop(n int, mode string, want int64, limit time.Duration) *FollowResult {
	deadline := time.Now().Add(limit)
	for f.events.Load() < want*int64(n) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	f.cancel()
	f.wg.Wait()
	return &FollowResult{Followers: n, Mode: mode, Events: f.events.Load(), Errors: f.errs.Load(), Lag: percentilesOf(f.lags)}
}

// FeedCatchUp is one read of the whole feed from the first event.
type FeedCatchUp struct {
	Events       int64         `json:"events"`
	Pages        int           `json:"pages"`
	MaxPageBytes int           `json:"max_page_bytes"`
	Elapsed      time.Duration `json:"elapsed_ns"`
	EventsSec    float64       `json:"events_per_sec"`
}

// feedCatchUp reads the context's feed from the first event to the end in
// pages of 1,000 over a raw NATS request (as a client in any language
// would), and checks it: every page within the max payload, every
// entity's versions exactly 1, 2, 3... once each, and at least what was
// acknowledged for each entity of the run.
func feedCatchUp(ctx context.Context, url, kctx string, acked []atomic.Int64, out io.Writer) (*FeedCatchUp, error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	maxPayload := int(nc.MaxPayload())
	last := map[string]int64{}
	res := &FeedCatchUp{}
	cursor := ""
	start := time.Now()
	for {
		body, _ := json.Marshal(kuma.FeedRequest{After: cursor, Limit: kuma.MaxFeedLimit})
		msg, err := nc.RequestWithContext(ctx, kuma.FeedSubject(kctx), body)
		if err != nil {
			return nil, fmt.Errorf("feed page %d: %w", res.Pages, err)
		}
		if len(msg.Data) > maxPayload {
			return nil, fmt.Errorf("feed page %d is %d bytes, over the max payload %d", res.Pages, len(msg.Data), maxPayload)
		}
		res.MaxPageBytes = max(res.MaxPageBytes, len(msg.Data))
		var page kuma.FeedReply
		if err := json.Unmarshal(msg.Data, &page); err != nil {
			return nil, fmt.Errorf("feed page %d: %w: %.200s", res.Pages, err, msg.Data)
		}
		if len(page.Events) == 0 {
			break
		}
		res.Pages++
		for _, e := range page.Events {
			if e.Version != last[e.Entity]+1 {
				return nil, fmt.Errorf("feed: %s version %d after %d", e.Entity, e.Version, last[e.Entity])
			}
			last[e.Entity] = e.Version
		}
		res.Events += int64(len(page.Events))
		cursor = page.Next
	}
	res.Elapsed = time.Since(start)
	res.EventsSec = float64(res.Events) / res.Elapsed.Seconds()
	for e := range acked {
		id := "user-" + strconv.Itoa(e)
		if want := acked[e].Load(); last[id] < want {
			return res, fmt.Errorf("feed: %s has %d events, %d were acknowledged", id, last[id], want)
		}
	}
	fmt.Fprintf(out, "feed catch-up from the first event: %d events in %d pages (largest %d bytes) in %s: %.0f events/s; every entity's versions once each, in order\n",
		res.Events, res.Pages, res.MaxPageBytes, res.Elapsed.Round(time.Millisecond), res.EventsSec)
	return res, nil
}

func (r *FollowResult) String() string {
	if r.Mode == followRaw {
		return fmt.Sprintf("%d raw feed followers saw %d events (%d failed); commit to delivery not measured (raw)", r.Followers, r.Events, r.Errors)
	}
	return fmt.Sprintf("%d feed followers saw %d events (%d failed); commit to delivery %s", r.Followers, r.Events, r.Errors, r.Lag)
}
