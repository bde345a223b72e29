package store_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"testing"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/store"
)

// ledger is a custom reducer: the state is {"balance": N}, events are
// Deposited / Withdrawn with {"amount": N}, and an overdraft is refused.
var ledger = kuma.ReducerFunc(func(state json.RawMessage, events []kuma.Event) (json.RawMessage, error) {
	var s struct {
		Balance int64 `json:"balance"`
	}
	if len(state) > 0 {
		if err := json.Unmarshal(state, &s); err != nil {
			return nil, err
		}
	}
	for _, e := range events {
		var d struct {
			Amount int64 `json:"amount"`
		}
		if err := json.Unmarshal(e.Data, &d); err != nil || d.Amount <= 0 {
			return nil, kuma.Errorf(kuma.CodeInvalidEvent, "version %d: amount must be a positive integer", e.Version)
		}
		switch e.Type {
		case "Deposited":
			s.Balance += d.Amount
		case "Withdrawn":
			if d.Amount > s.Balance {
				return nil, kuma.Errorf(kuma.CodeInvalidEvent, "version %d: overdraft of %d", e.Version, d.Amount-s.Balance)
			}
			s.Balance -= d.Amount
		default:
			return nil, kuma.Errorf(kuma.CodeInvalidEvent, "unknown event type %q", e.Type)
		}
	}
	return json.Marshal(s)
})

func ev(typ string, amount int) kuma.EventInput {
	return kuma.EventInput{Type: typ, Data: json.RawMessage(`{"amount":` + strconv.Itoa(amount) + `}`)}
}

func TestCustomReducerPerContext(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s, err := store.Start(ctx, dir, store.Shards(4), store.Context("payments"), store.Reducer(ledger))
	if err != nil {
		t.Fatal(err)
	}
	acct := s.Entity("acct-7")
	if _, err := acct.Append(ctx, ev("Deposited", 100), ev("Withdrawn", 30)); err != nil {
		t.Fatal(err)
	}
	// The reducer refuses an overdraft: the whole batch is refused, nothing stored.
	_, err = acct.Append(ctx, ev("Deposited", 5), ev("Withdrawn", 500))
	if !errors.Is(err, kuma.ErrInvalidEvent) {
		t.Fatalf("overdraft = %v, want invalid_event", err)
	}
	r, err := acct.Read(ctx)
	if err != nil || r.Version != 2 || string(r.State) != `{"balance":70}` {
		t.Fatalf("read = %+v, %v; want version 2 balance 70", r, err)
	}
	r, err = acct.Read(ctx, client.AtVersion(1))
	if err != nil || string(r.State) != `{"balance":100}` {
		t.Fatalf("read at 1 = %+v, %v", r, err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// After a restart the state is folded again with the same reducer.
	s, err = store.Start(ctx, dir, store.Shards(4), store.Context("payments"), store.Reducer(ledger))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	r, err = s.Entity("acct-7").Read(ctx)
	if err != nil || string(r.State) != `{"balance":70}` {
		t.Fatalf("read after restart = %+v, %v", r, err)
	}
}

// Example shows the embedding API: a whole Kuma inside a Go program.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "kuma-example-")
	defer os.RemoveAll(dir)

	s, err := store.Start(ctx, dir, store.Shards(16))
	if err != nil {
		panic(err)
	}
	defer s.Close(ctx)

	user := s.Entity("user_0x9A4F")
	user.Append(ctx, kuma.EventInput{Type: "UserCreated", Data: json.RawMessage(`{"name":"Dwighson","role":"architect"}`)})
	user.Append(ctx, kuma.EventInput{Type: "UserMoved", Data: json.RawMessage(`{"city":"Oslo","role":null}`)})

	now, _ := user.Read(ctx)
	then, _ := user.Read(ctx, client.AtVersion(1))
	fmt.Println(now.Version, string(now.State))
	fmt.Println(then.Version, string(then.State))
	// Output:
	// 2 {"city":"Oslo","name":"Dwighson"}
	// 1 {"name":"Dwighson","role":"architect"}
}
