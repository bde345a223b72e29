package kuma

import "time"

// StreamMessage is the body of one message on kuma.<ctx>.events.<shard>: a
// run of that shard's committed events in commit order. Its header
// Nats-Msg-Id is "<ctx>.<shard>.e<epoch>.<last sequence>" in a cluster and
// "<ctx>.<shard>.<last sequence>" outside one (JetStream drops a
// republished duplicate), Kuma-Last-Position carries the last event's
// position, and Kuma-Owner-Epoch the publishing owner's epoch. The body is
// this type's JSON (format 1), or with Kuma-Format: 2 its binary form
// (stream2.go); DecodeStreamMessageFormat reads either into this type.
type StreamMessage struct {
	Context string        `json:"context"`
	Shard   int           `json:"shard"`
	Events  []StreamEvent `json:"events"`
}

// StreamEvent is one event in a stream message. Payload is the event's type
// and data sealed under the entity's key (base64 in JSON): opening it needs
// the keyvault, so a forgotten entity's messages stay noise wherever they are.
//
// The entity is named by its Pseudonym, never in the clear: the keyvault's
// keyed hash of (context, id), which only the keyvault can compute and which
// it resolves to the key and the id while the entity lives. Once the key is
// shredded, nothing in the stream leads back to the id. Entity is set only in
// messages written before pseudonyms (a store upgraded in place), and by
// readers once they have resolved the pseudonym.
type StreamEvent struct {
	Pseudonym string    `json:"pseudonym,omitempty"`
	Entity    string    `json:"entity,omitempty"`
	Version   int64     `json:"version"`
	Position  string    `json:"position"`
	Time      time.Time `json:"time"`
	Payload   []byte    `json:"payload"`
	// IdempotencyKey is set on the last event of an append that carried an
	// idempotency key: the key's SHA-256 ("sha256:<base64url>", never the
	// key itself), with FirstVersion the append's first version. A node that
	// rebuilds the shard from the stream recognises the client's retry.
	IdempotencyKey string `json:"idempotency_key,omitempty"`
	FirstVersion   int64  `json:"first_version,omitempty"`
}

// HeaderLastPosition names the last event's position in a stream message.
const HeaderLastPosition = "Kuma-Last-Position"

// HeaderEpoch marks a shard's epoch claim: a message of no events that a
// node publishes when it takes a shard over, carrying its lease epoch and,
// in Kuma-Last-Position, the position the shard stands at. Consumers skip it
// (it has no events); it fences the previous owner out of the stream.
const HeaderEpoch = "Kuma-Epoch"

// HeaderOwnerEpoch is on every events message of a clustered shard: the
// lease epoch of the owner that published it. Positions are the shard's, so
// after a take-over the same position can be another owner's event; the
// epoch tells them apart (the message id carries it too: "<ctx>.<shard>.e<epoch>.<last>").
const HeaderOwnerEpoch = "Kuma-Owner-Epoch"

// ForgottenNotice is the body of a message on kuma.<ctx>.events.<shard>.forgotten:
// the entity of Pseudonym was forgotten at At. Its key is already destroyed
// when the notice is published; read models drop what they hold of it, once
// the keyvault confirms the shred (anyone able to publish into the stream
// could write a notice). Nats-Msg-Id is "<ctx>.<shard>.forgotten.<pseudonym>",
// so a forget finished again after a crash is not announced twice within the
// stream's duplicate window (and a second notice would be harmless:
// forgetting is idempotent). Entity is set, instead of Pseudonym, only in
// notices written before pseudonyms.
type ForgottenNotice struct {
	Context   string    `json:"context"`
	Shard     int       `json:"shard"`
	Pseudonym string    `json:"pseudonym,omitempty"`
	Entity    string    `json:"entity,omitempty"`
	At        time.Time `json:"at"`
}
