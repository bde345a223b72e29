package client

import (
	"context"
	"strconv"

	"github.com/kumadb/kuma/pkg/kuma"
)

// Migrate pins a shard of the client's context to a node, which moves it
// there: the answer comes once the pin is written, with the shard's owner
// and epoch at that moment; Status shows when the move is done (the owner
// is the node and the shard is not moving). The pin stays until Unpin, so
// the shard also returns there after the node restarts. A node that is not
// a live, non-draining member answers not_found, with the members in the
// error's details; a shard out of range answers bad_request.
func (c *Client) Migrate(ctx context.Context, shard int, to string) (*kuma.MigrateReply, error) {
	return c.migrate(ctx, kuma.MigrateRequest{Shard: &shard, To: to})
}

// Unpin removes a shard's pin: the shard goes back to where rendezvous
// hashing over the members puts it (the reply's To). Unpinning a shard
// that has no pin succeeds.
func (c *Client) Unpin(ctx context.Context, shard int) (*kuma.MigrateReply, error) {
	return c.migrate(ctx, kuma.MigrateRequest{Shard: &shard, Unpin: true})
}

func (c *Client) migrate(ctx context.Context, req kuma.MigrateRequest) (*kuma.MigrateReply, error) {
	var out kuma.MigrateReply
	if err := c.request(ctx, "migrate", "shard "+strconv.Itoa(*req.Shard), kuma.MigrateSubject(c.opts.Context), req, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
