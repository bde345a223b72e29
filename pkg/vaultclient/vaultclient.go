// Package vaultclient is the keyvault's internal NATS protocol: its subjects,
// its messages, and the client a shardnode in another process uses. Data keys
// cross NATS in these replies, so the _kuma.keyvault.> subjects must be open
// to shardnodes only (NATS permissions) and NATS should run with TLS.
package vaultclient

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// Subjects of the keyvault service.
const (
	SubjectKey       = "_kuma.keyvault.key"
	SubjectShred     = "_kuma.keyvault.shred"
	SubjectForgotten = "_kuma.keyvault.forgotten"
	// SubjectPseudonyms computes the stream pseudonyms of a list of ids.
	SubjectPseudonyms = "_kuma.keyvault.pseudonyms"
	// SubjectShredded is broadcast after every shred so that every key cache
	// drops the key at once.
	SubjectShredded = "_kuma.keyvault.shredded"
	// SubjectBackup uploads a consistent copy of the keyvault for `kuma
	// backup` (kuma.BackupRequest, kuma.BackupReply); admin only.
	SubjectBackup = "_kuma.keyvault.backup"
	// SubjectTombstones lists the forgotten ids, by pseudonym
	// (kuma.TombstonesRequest, kuma.TombstonesReply); admin only.
	SubjectTombstones = "_kuma.keyvault.tombstones"
)

// KeyRequest asks for an entity's data key, creating it when Create is set.
// Pseudonym, instead of Entity, names the entity as the event stream does
// (Create is then ignored: only an existing key is found by it).
type KeyRequest struct {
	Context   string `json:"context"`
	Entity    string `json:"entity,omitempty"`
	Pseudonym string `json:"pseudonym,omitempty"`
	Create    bool   `json:"create,omitempty"`
}

// KeyReply carries the raw data key, the entity's pseudonym in the event
// stream, and its id (what a request by pseudonym learns).
type KeyReply struct {
	Key       []byte `json:"key"`
	Pseudonym string `json:"pseudonym"`
	Entity    string `json:"entity"`
}

// PseudonymsRequest asks for the pseudonyms of ids (at most 10,000).
type PseudonymsRequest struct {
	Context  string   `json:"context"`
	Entities []string `json:"entities"`
}

// PseudonymsReply has the pseudonyms in the order of the request's ids.
type PseudonymsReply struct {
	Pseudonyms []string `json:"pseudonyms"`
}

// ShredRequest destroys an entity's key and records it as forgotten.
type ShredRequest struct {
	Context       string    `json:"context"`
	Entity        string    `json:"entity"`
	Reason        string    `json:"reason,omitempty"`
	RequestedBy   string    `json:"requested_by,omitempty"`
	EventsDeleted int64     `json:"events_deleted"`
	At            time.Time `json:"at"`
}

// Shredded is the broadcast after a shred.
type Shredded struct {
	Context string `json:"context"`
	Entity  string `json:"entity"`
}

// Client talks to a keyvault over NATS. It is safe for concurrent use.
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
}

// New returns a client; timeout bounds each call whose ctx has no deadline.
func New(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	return &Client{nc: nc, timeout: timeout}
}

// DataKey returns the entity's key: kuma.ErrNotFound when it has none and
// create is false, kuma.ErrEntityForgotten when it was shredded.
func (c *Client) DataKey(ctx context.Context, kctx, entity string, create bool) (KeyReply, error) {
	var out KeyReply
	if err := c.call(ctx, SubjectKey, KeyRequest{Context: kctx, Entity: entity, Create: create}, &out); err != nil {
		return KeyReply{}, err
	}
	return out, nil
}

// KeyByPseudonym returns the key and id of the entity a stream message
// names by pseudonym: kuma.ErrEntityForgotten once it is shredded.
func (c *Client) KeyByPseudonym(ctx context.Context, kctx, pseudonym string) (KeyReply, error) {
	var out KeyReply
	if err := c.call(ctx, SubjectKey, KeyRequest{Context: kctx, Pseudonym: pseudonym}, &out); err != nil {
		return KeyReply{}, err
	}
	return out, nil
}

// ForgottenPseudonym returns the forget record of the entity of a
// pseudonym (without its id), or nil if it was not forgotten.
func (c *Client) ForgottenPseudonym(ctx context.Context, kctx, pseudonym string) (*kuma.ForgetReply, error) {
	var out kuma.ForgetReply
	err := c.call(ctx, SubjectForgotten, KeyRequest{Context: kctx, Pseudonym: pseudonym}, &out)
	if errors.Is(err, kuma.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// Pseudonyms returns the pseudonyms of ids, in order.
func (c *Client) Pseudonyms(ctx context.Context, kctx string, entities []string) ([]string, error) {
	var out PseudonymsReply
	if err := c.call(ctx, SubjectPseudonyms, PseudonymsRequest{Context: kctx, Entities: entities}, &out); err != nil {
		return nil, err
	}
	return out.Pseudonyms, nil
}

// Shred destroys the key (idempotent: a second call returns the first record).
func (c *Client) Shred(ctx context.Context, req ShredRequest) (*kuma.ForgetReply, error) {
	var out kuma.ForgetReply
	if err := c.call(ctx, SubjectShred, req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Forgotten returns the forget record of an entity, or nil if it was never
// forgotten.
func (c *Client) Forgotten(ctx context.Context, kctx, entity string) (*kuma.ForgetReply, error) {
	var out kuma.ForgetReply
	err := c.call(ctx, SubjectForgotten, KeyRequest{Context: kctx, Entity: entity}, &out)
	if errors.Is(err, kuma.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *Client) call(ctx context.Context, subject string, req, out any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	msg, err := c.nc.RequestWithContext(ctx, subject, body)
	if err != nil {
		if natsbus.IsNoResponders(err) {
			return kuma.Errorf(kuma.CodeUnavailable, "keyvault is not running")
		}
		return kuma.Errorf(kuma.CodeUnavailable, "keyvault: %v", err)
	}
	if rerr := natsbus.ReplyError(msg); rerr != nil {
		return rerr
	}
	return json.Unmarshal(msg.Data, out)
}
