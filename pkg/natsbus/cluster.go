package natsbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// accountStatzPing is the one cluster-wide question a user outside the
// system account may ask: every server it reaches answers with its own
// identity, JetStream flag included. The $JS.API has no member list, and
// the server pings ($SYS.REQ.SERVER.PING.JSZ) are for the system account.
const accountStatzPing = "$SYS.REQ.ACCOUNT.PING.STATZ"

// peersQuiet is how long JetStreamPeers waits for one more answer after the
// last one: the servers answer one request at once, so a gap this long
// means they have all spoken. A late answer counts a server short, which
// errs towards fewer replicas.
const peersQuiet = 250 * time.Millisecond

// JetStreamPeers counts the JetStream servers of nc's cluster that are up:
// it asks every server reachable from nc (as an ordinary user, through the
// account STATZ ping) and counts the distinct ones that run JetStream and
// belong to the cluster nc is connected to (servers behind gateways place
// no replicas of this cluster's streams). A member that is down is not
// counted, so the answer is how many replicas a stream created now can get.
// It returns after ctx ends or when no answer came for 250 ms after the last
// one; it errs if no server answered at all. Safe for concurrent use.
func JetStreamPeers(ctx context.Context, nc *nats.Conn) (int, error) {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return 0, fmt.Errorf("nats: jetstream peers: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	// include_unused: a server answers even when this account has no
	// connection on it; the cluster filter keeps other clusters quiet.
	req := map[string]any{"include_unused": true}
	if cluster := nc.ConnectedClusterName(); cluster != "" {
		req["cluster"] = cluster
		req["exact_match"] = true
	}
	body, _ := json.Marshal(req)
	if err := nc.PublishRequest(accountStatzPing, inbox, body); err != nil {
		return 0, fmt.Errorf("nats: jetstream peers: %w", err)
	}
	seen := map[string]bool{} // server id → runs JetStream
	for {
		wait := ctx
		cancel := context.CancelFunc(func() {})
		if len(seen) > 0 {
			wait, cancel = context.WithTimeout(ctx, peersQuiet)
		}
		msg, err := sub.NextMsgWithContext(wait)
		cancel()
		if err != nil {
			if len(seen) > 0 {
				break // quiet, or ctx ended: count who answered
			}
			return 0, fmt.Errorf("nats: jetstream peers: no server answered %s: %w", accountStatzPing, err)
		}
		if msg.Header.Get("Status") == "503" {
			return 0, fmt.Errorf("nats: jetstream peers: no server answers %s (no system account?)", accountStatzPing)
		}
		var resp struct {
			Server *server.ServerInfo `json:"server"`
			Error  *server.ApiError   `json:"error"`
		}
		if err := json.Unmarshal(msg.Data, &resp); err != nil || resp.Server == nil || resp.Error != nil {
			continue // not a usable answer; the others still count
		}
		seen[resp.Server.ID] = resp.Server.JetStream || resp.Server.Flags&server.JetStreamEnabled != 0
	}
	n := 0
	for _, js := range seen {
		if js {
			n++
		}
	}
	return n, nil
}

// Replicas is the replica count Kuma gives its streams and KV buckets in a
// cluster of peers JetStream servers: 3 from three servers on, so that one
// may be lost, else 1. Two servers get 1, not 2: two replicas need both
// servers for a quorum, which survives nothing more than one replica does
// and doubles the writes. Kuma never goes above 3.
func Replicas(peers int) int {
	if peers >= 3 {
		return 3
	}
	return 1
}

// WaitJetStream waits until JetStream answers nc's account (for a cluster:
// a meta leader is elected, since only it answers), retrying until ctx
// ends. A clustered server's JetStream answers only once a quorum of its
// meta group is up, which for a first member means a second has joined.
// The error, when ctx ends first, wraps ctx's and the last answer, such as
// the API error 10008 "JetStream system temporarily unavailable".
func WaitJetStream(ctx context.Context, nc *nats.Conn) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("nats: %w", err)
	}
	backoff := 50 * time.Millisecond
	for {
		attempt, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := js.AccountInfo(attempt)
		cancel()
		if err == nil {
			return nil
		}
		if errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			return fmt.Errorf("nats: %w", err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("nats: JetStream not answering (a clustered server needs a quorum of its members up): %w", errors.Join(ctx.Err(), err))
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// RetryJetStream runs setup, and runs it again while JetStream answers
// that it is not ready: a request timing out or error 10008 ("JetStream
// system temporarily unavailable"). Right after a NATS cluster forms or
// loses a server, its meta leader is being elected and API requests go
// unanswered for a few seconds, and a stream gaining replicas takes no
// consumer until it has them; a service starting then must wait, not fail.
// Every other error, such as a permission refused, returns at once. Each
// attempt has 10 s; the whole is bounded by ctx and by one minute.
func RetryJetStream(ctx context.Context, log *slog.Logger, setup func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, acancel := context.WithTimeout(ctx, 10*time.Second)
		err := setup(actx)
		acancel()
		if err == nil || ctx.Err() != nil || !JetStreamNotReady(err) {
			return err
		}
		log.Warn("JetStream not answering yet; trying again", "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// JetStreamNotReady reports whether err is JetStream saying it cannot
// answer yet: a timeout, no responders, an API error 503 such as 10008
// (temporarily unavailable) or 10023 (insufficient resources, while a
// stream moves to more replicas), or 10005 (no suitable peers, while the
// cluster's servers are still joining).
func JetStreamNotReady(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeJetStreamNotEnabled {
		return false // JetStream is off: waiting will not help
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders) ||
		errors.As(err, &apiErr) && (apiErr.Code == 503 || apiErr.ErrorCode == errNoSuitablePeers)
}

// errNoSuitablePeers is JetStream's 10005, "no suitable peers for
// placement": a stream already raised to three replicas (by a node that
// counted three servers) while this server's meta group does not yet see
// the third, as when nodes start together. It passes once they all have.
const errNoSuitablePeers jetstream.ErrorCode = 10005
