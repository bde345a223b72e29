// Package projection declares read models: SQL tables that a projector keeps
// up to date from the event stream, and the named read-only queries that
// clients run against them.
//
// A projection is a [Spec], built in Go or declared in a YAML file and read
// with [Load] or [Parse]. [Compile] (or [CompileAll] for a whole file) checks
// it against a scratch in-memory SQLite database before anything runs, so a
// misspelt column fails at start with the file, the line and the fix rather
// than at the first event. The projector engine runs the [Compiled] result: it
// creates the tables in a fresh read-model file, runs the statement for each
// event's type with the arguments of [Statement.BindEvent], and answers
// queries with [Statement.BindQuery]. This package holds no state and starts
// nothing; it only declares, checks and binds.
//
// # File format
//
// A file holds one YAML document with a single top-level key:
//
//	projections:
//	  - name: balances
//	    tables:
//	      - CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0)
//	    on:
//	      Deposited: INSERT INTO balances (account, balance) VALUES (:entity, :amount) ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance
//	      Withdrawn: UPDATE balances SET balance = balance - :amount WHERE account = :entity
//	    forget: DELETE FROM balances WHERE account = :entity
//	    queries:
//	      by_account:
//	        sql: SELECT account, balance FROM balances WHERE account = :account
//
// The keys of a projection are:
//
//   - name: required; 1 to 63 lowercase letters, digits or underscores,
//     starting with a letter. "entities" is reserved for the built-in
//     projection, and names are unique within a file.
//   - tables: required; CREATE TABLE, CREATE [UNIQUE] INDEX or CREATE VIEW
//     statements, run in order on a fresh read-model file. Names starting with
//     _kuma or sqlite_ are reserved.
//   - on: required; maps an event type to one INSERT, UPDATE, DELETE or
//     REPLACE statement (a WITH clause in front is fine). The key "*" runs for
//     every event type that has no statement of its own; quote it, because a
//     bare * starts a YAML alias.
//   - forget: optional; one statement run when an entity is forgotten. It may
//     use only :entity, since nothing else of the entity is left to bind.
//   - queries: optional; maps a query name (same rule as a projection name) to
//     a mapping whose only key is sql, one SELECT statement (or WITH ...
//     SELECT). Queries are read-only.
//
// Every SQL string is exactly one statement; a single trailing semicolon is
// allowed. A plain YAML scalar cannot contain ": " or " #", so write longer
// SQL as a literal block (sql: |) on the lines below. Unknown keys are errors,
// so a misspelt key is never silently ignored.
//
// # Parameters
//
// Statements name their parameters :name, where name is a letter followed by
// letters, digits and underscores (database/sql binds no other names); the
// ?, ?NNN, @name and $name forms are refused so that every parameter is bound
// by name. In the statements of
// on and forget these names bind the event:
//
//	:entity    TEXT     the entity id
//	:version   INTEGER  the entity's version after the event
//	:time      TEXT     the event time, RFC 3339 in UTC with six fraction digits (2026-11-25T14:03:07.120000Z), so it sorts as text
//	:position  TEXT     the event's position (p1.3.1042)
//	:type      TEXT     the event type
//	:data      TEXT     the event data as JSON, for json_extract and friends
//
// Any other :name binds the top-level field name of the event data: a string
// as TEXT, a whole number that fits in 64 bits as INTEGER (exactly, however
// large), any other number as REAL, true and false as 1 and 0, null or a
// missing field as NULL, and an object or array as its JSON text. Fields whose
// names are not identifiers are reached through json_extract(:data, ...).
//
// In queries every :name is a parameter of the request, bound the same way
// except that objects and arrays are refused.
//
// # Errors
//
// Every problem is reported, not only the first, as an [*Error] joined with
// errors.Join. Each reads
//
//	projections.yaml:12: projection "balances": on Deposited: no such column: amout (fix: the columns of balances are account, balance)
//
// and a Spec built in Go has no file and line, so its errors start at
// projection "balances".
package projection
