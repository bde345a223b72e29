package keyvault

import (
	"context"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// store is where a keyvault keeps the wrapped data keys and the tombstones
// of forgotten ids. The Service validates names, computes the id hash and
// broadcasts shreds; a store only keeps. Both stores pass one conformance
// suite (conformance_test.go).
//
// Expected outcomes are kuma errors: not_found for no key (and !create, or
// a lookup by pseudonym), entity_forgotten for a tombstoned id; anything
// else is a failed store and answers internal. Every method is safe for
// concurrent use, also from several Services sharing one JetStream bucket.
type store interface {
	// key returns the data key of the entity whose id hash is hash,
	// creating it when create is set and the id was never forgotten. entity
	// names it, or is empty for a lookup by pseudonym, which returns the id
	// found as well. A created key is durable before key returns, and
	// every caller of any instance gets the same key for one entity.
	key(ctx context.Context, kctx, entity string, hash []byte, create bool) (dek []byte, found string, err error)
	// shred destroys the entity's key and tombstones its id hash. A second
	// shred returns the first record, with fresh false.
	shred(ctx context.Context, kctx, entity string, hash []byte, r vaultclient.ShredRequest) (rec *kuma.ForgetReply, fresh bool, err error)
	// forgotten returns the tombstone of the id hash, or nil.
	forgotten(ctx context.Context, kctx, entity string, hash []byte) (*kuma.ForgetReply, error)
	// close finishes the operations under way; later calls answer
	// unavailable.
	close() error
}
