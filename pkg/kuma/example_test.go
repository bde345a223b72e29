package kuma_test

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/kumadb/kuma/pkg/kuma"
)

// The default reducer folds each event's data into the state as a JSON Merge
// Patch (RFC 7386): members are set, null removes a member, objects merge and
// everything else replaces.
func ExampleMergePatch() {
	events := []kuma.Event{
		{Entity: "user_0x9A4F", Version: 1, Type: "UserCreated",
			Data: json.RawMessage(`{"name": "Dwighson", "role": "architect", "tags": ["a", "b"]}`)},
		{Entity: "user_0x9A4F", Version: 2, Type: "UserPromoted",
			Data: json.RawMessage(`{"role": "lead", "tags": ["c"]}`)},
		{Entity: "user_0x9A4F", Version: 3, Type: "UserMoved",
			Data: json.RawMessage(`{"tags": null, "address": {"city": "Lyon"}}`)},
	}

	// A new entity starts from a nil state.
	state, err := kuma.MergePatch{}.Fold(nil, events[:2])
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(string(state))

	// Folding the rest onto a saved state gives the same result as a full replay.
	state, err = kuma.MergePatch{}.Fold(state, events[2:])
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(string(state))
	// Output:
	// {"name":"Dwighson","role":"lead","tags":["c"]}
	// {"address":{"city":"Lyon"},"name":"Dwighson","role":"lead"}
}

// Protocol errors match the package's sentinels by code with errors.Is, through
// any wrapping, and errors.As gives the details, such as the actual version of
// a version_conflict, also after the error came over the wire as JSON.
func ExampleError() {
	// An error reply body as a server sends it.
	body := []byte(`{"error": {"code": "version_conflict",
		"message": "expected version 3, entity is at version 5",
		"details": {"actual_version": 5}}}`)

	var reply kuma.ErrorReply
	if err := json.Unmarshal(body, &reply); err != nil {
		fmt.Println(err)
		return
	}
	err := fmt.Errorf("append user_0x9A4F: %w", reply.Error)

	fmt.Println(errors.Is(err, kuma.ErrVersionConflict))
	fmt.Println(errors.Is(err, kuma.ErrNotFound))

	var kerr *kuma.Error
	if errors.As(err, &kerr) {
		v, ok := kerr.ActualVersion()
		fmt.Println(kerr.Code, kerr.Code.Status(), v, ok)
	}

	// Anything that is not a protocol error is internal, with its text hidden.
	fmt.Println(kuma.AsError(errors.New("disk I/O error on /var/lib/kuma")))
	// Output:
	// true
	// false
	// version_conflict 409 5 true
	// internal: internal error
}
