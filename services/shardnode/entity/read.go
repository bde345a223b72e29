package entity

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/kumadb/kuma/pkg/envelope"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/replysize"
	"github.com/kumadb/kuma/pkg/sqlite"
)

// missing answers for an entity with no events here: entity_forgotten if the
// keyvault remembers it as forgotten, else not_found.
func (a *Actor) missing(ctx context.Context) error {
	if !a.checkedForgotten {
		fr, err := a.sh.Vault.Forgotten(ctx, a.sh.Context, a.id)
		if err != nil {
			return err
		}
		a.checkedForgotten = true
		if fr != nil {
			a.becomeForgotten(fr)
		}
	}
	if a.forgotten != nil {
		return a.forgottenError()
	}
	return kuma.Errorf(kuma.CodeNotFound, "entity %q has no events", a.id)
}

func (a *Actor) read(ctx context.Context, r *kuma.ReadRequest) (*kuma.ReadReply, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.missing(ctx)
	}
	v := a.version
	switch {
	case r.AtVersion != nil:
		if *r.AtVersion > a.version {
			return nil, &kuma.Error{Code: kuma.CodeNotFound,
				Message: fmt.Sprintf("entity %q has no version %d; it is at version %d", a.id, *r.AtVersion, a.version),
				Details: map[string]any{"actual_version": a.version}}
		}
		v = *r.AtVersion
	case r.AtTime != nil:
		at, err := a.sh.Store.VersionAt(ctx, a.id, *r.AtTime)
		if err != nil {
			return nil, err
		}
		if at == 0 {
			return nil, kuma.Errorf(kuma.CodeNotFound, "entity %q did not exist yet at %s", a.id, r.AtTime.UTC().Format(time.RFC3339Nano))
		}
		v = at
	}
	if v == a.version {
		return &kuma.ReadReply{Entity: a.id, Version: a.version, State: a.state, CreatedAt: a.createdAt, UpdatedAt: a.updatedAt}, nil
	}
	state, at, err := a.stateAt(ctx, v)
	if err != nil {
		return nil, err
	}
	return &kuma.ReadReply{Entity: a.id, Version: v, State: state, CreatedAt: a.createdAt, UpdatedAt: at}, nil
}

// open decrypts stored events. A payload that does not open (tampered, or
// moved from another entity or version) is an internal error, logged, and
// never returned as data.
func (a *Actor) open(stored []sqlite.StoredEvent) ([]kuma.RecordedEvent, error) {
	out := make([]kuma.RecordedEvent, len(stored))
	for i, e := range stored {
		plain, err := a.key.Open(e.Payload, envelope.AAD(envelope.PurposeEvent, a.sh.Context, a.id, e.Version))
		if err != nil {
			return nil, a.tampered("event", e.Version)
		}
		typ, data, err := envelope.DecodeEvent(plain)
		if err != nil {
			return nil, a.tampered("event", e.Version)
		}
		out[i] = kuma.RecordedEvent{Version: e.Version, Type: typ, Data: data, Time: e.Time}
	}
	return out, nil
}

func (a *Actor) tampered(what string, version int64) error {
	a.sh.Logger.Error("sealed data does not open: tampered, misplaced or wrong key",
		"context", a.sh.Context, "shard", a.sh.N, "entity", a.id, "what", what, "version", version)
	return kuma.Errorf(kuma.CodeInternal, "internal error")
}

func (a *Actor) forgottenError() error {
	return &kuma.Error{Code: kuma.CodeEntityForgotten,
		Message: fmt.Sprintf("entity %q was forgotten at %s", a.id, a.forgotten.ForgottenAt.Format(time.RFC3339Nano))}
}

// history answers one page of events from r.FromVersion: at most r.Limit
// events, and no more than fit in one answer of a.sh.MaxReply bytes, so
// that a page of large events is cut short (next_version says where to go
// on) instead of being lost. The page is encoded here, each event once, to
// measure it; the bytes are what json.Marshal makes of a HistoryReply.
func (a *Actor) history(ctx context.Context, r *kuma.HistoryRequest) (any, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.missing(ctx)
	}
	if r.FromVersion > a.version {
		return &kuma.HistoryReply{Entity: a.id, Events: []kuma.RecordedEvent{}}, nil
	}
	stored, err := a.sh.Store.Events(ctx, a.id, r.FromVersion, a.version, r.Limit)
	if err != nil {
		return nil, err
	}
	id, err := json.Marshal(a.id)
	if err != nil {
		return nil, err
	}
	// The reply around the events, with room for the longest next_version.
	const around = len(`{"entity":,"events":,"next_version":-9223372036854775808}`)
	page := replysize.NewPage(a.sh.MaxReply, around+len(id))
	var next *int64
	for i := range stored {
		// Opened one at a time: the events past the cut are not
		// decrypted for nothing.
		ev, err := a.open(stored[i : i+1])
		if err != nil {
			return nil, err
		}
		fits, size, err := page.Add(&ev[0])
		if err != nil {
			return nil, err
		}
		if fits {
			continue
		}
		v := ev[0].Version
		if page.Len() == 0 {
			e := replysize.TooLarge(size+around+len(id)+2, a.sh.MaxReply, fmt.Sprintf("event %d of %q", v, a.id),
				fmt.Sprintf("no page can hold it until the NATS server's max_payload is raised; history from_version %d goes on after it", v+1))
			e.Details["version"] = v
			return nil, e
		}
		next = &v
		break
	}
	if n := len(stored); next == nil && n > 0 && stored[n-1].Version < a.version {
		v := stored[n-1].Version + 1
		next = &v
	}
	b := make([]byte, 0, len(id)+around+page.Size())
	b = append(append(append(b, `{"entity":`...), id...), `,"events":`...)
	b = append(page.AppendTo(b), `,"next_version":`...)
	if next == nil {
		b = append(b, "null"...)
	} else {
		b = strconv.AppendInt(b, *next, 10)
	}
	return json.RawMessage(append(b, '}')), nil
}

// export answers everything held about the entity. The answer passes the
// same size check as every other (handle): an entity too large for one
// message answers payload_too_large, and the client pages history.
func (a *Actor) export(ctx context.Context, body []byte) (*kuma.ExportReply, error) {
	if err := kuma.DecodeEmpty(body); err != nil {
		return nil, err
	}
	if a.version == 0 {
		return nil, a.missing(ctx)
	}
	stored, err := a.sh.Store.Events(ctx, a.id, 1, a.version, 0)
	if err != nil {
		return nil, err
	}
	events, err := a.open(stored)
	if err != nil {
		return nil, err
	}
	return &kuma.ExportReply{Entity: a.id, Version: a.version, State: a.state, Events: events,
		ExportedAt: a.sh.Now().UTC()}, nil
}
