package projection_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log"
	"maps"
	"slices"
	"time"

	"github.com/kumadb/kuma/pkg/projection"
	_ "modernc.org/sqlite"
)

// Example loads the projections of testdata/example.yaml and plays the part
// of the engine for one of them: create the tables, project some events,
// answer a query.
func Example() {
	ctx := context.Background()
	specs, err := projection.Load("testdata/example.yaml")
	if err != nil {
		log.Fatal(err)
	}
	compiled, err := projection.CompileAll(ctx, specs)
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range compiled {
		fmt.Println(c.Spec.Name, slices.Sorted(maps.Keys(c.On)), slices.Sorted(maps.Keys(c.Queries)))
	}
	balances := compiled[0]

	db, err := sql.Open("sqlite", ":memory:")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1) // one in-memory database
	for _, ddl := range balances.Spec.Tables {
		if _, err := db.ExecContext(ctx, ddl); err != nil {
			log.Fatal(err)
		}
	}

	at := time.Date(2026, 11, 25, 14, 3, 7, 0, time.UTC)
	events := []projection.Event{
		{Entity: "acc-1", Version: 1, Time: at, Position: "p1.3.1040", Type: "Deposited", Data: json.RawMessage(`{"amount": 9007199254740993}`)},
		{Entity: "acc-2", Version: 1, Time: at, Position: "p1.3.1041", Type: "Deposited", Data: json.RawMessage(`{"amount": 50}`)},
		{Entity: "acc-1", Version: 2, Time: at, Position: "p1.3.1042", Type: "Withdrawn", Data: json.RawMessage(`{"amount": 3}`)},
	}
	for _, ev := range events {
		st := balances.On[ev.Type]
		args, err := st.BindEvent(ev)
		if err != nil {
			log.Fatal(err)
		}
		if _, err := db.ExecContext(ctx, st.SQL, args...); err != nil {
			log.Fatal(err)
		}
	}

	q := balances.Queries["by_account"]
	fmt.Println("by_account takes", q.Params)
	args, err := q.BindQuery(map[string]json.RawMessage{"account": json.RawMessage(`"acc-1"`)})
	if err != nil {
		log.Fatal(err)
	}
	var (
		account string
		balance int64
	)
	if err := db.QueryRowContext(ctx, q.SQL, args...).Scan(&account, &balance); err != nil {
		log.Fatal(err)
	}
	fmt.Println(account, balance)

	_, err = q.BindQuery(map[string]json.RawMessage{"acount": json.RawMessage(`"acc-1"`)})
	fmt.Println(err)
	// Output:
	// balances [Deposited Withdrawn] [by_account richest]
	// activity [*] [per_day since]
	// owners [AccountClosed AccountOpened] [of_owner]
	// by_account takes [account]
	// acc-1 9007199254740990
	// bad_request: missing parameter "account"; unknown parameter "acount" (did you mean "account"?); the query takes account
}

// ExampleParse shows an error report: every problem, each with its line and
// its fix. Parse reports the structure of the file; CompileAll checks the SQL.
func ExampleParse() {
	_, err := projection.Parse("projections.yaml", []byte(`projections:
  - name: balances
    tabels:
      - CREATE TABLE balances (account TEXT PRIMARY KEY)
    querys: {}
`))
	fmt.Println(err)

	specs, err := projection.Parse("projections.yaml", []byte(`projections:
  - name: balances
    tables:
      - CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0)
    on:
      Deposited: UPDATE balances SET balance = balance + :amount WHERE acount = :entity
      Withdrawn: UPDATE balances SET balance = balance - ? WHERE account = :entity
`))
	if err != nil {
		log.Fatal(err)
	}
	_, err = projection.CompileAll(context.Background(), specs)
	fmt.Println(err)
	// Output:
	// projections.yaml:3: projection "balances": unknown key "tabels" (fix: did you mean tables?)
	// projections.yaml:5: projection "balances": unknown key "querys" (fix: did you mean queries?)
	// projections.yaml:6: projection "balances": on Deposited: no such column: acount (fix: did you mean account? the columns of balances are account, balance)
	// projections.yaml:7: projection "balances": on Withdrawn: parameter ? is not supported (fix: use :name)
}

// ExampleParamNames lists the parameters of a statement.
func ExampleParamNames() {
	fmt.Println(projection.ParamNames(`SELECT 'a:b', "c:d", :account -- :comment
FROM balances WHERE balance > :min AND account <> :account`))
	// Output:
	// [account min]
}
