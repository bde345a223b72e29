package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats.go"
)

// cmdClient runs append, read, history and export. It prints the reply as
// JSON on stdout; on failure it prints {"error": {...}} on stderr and exits 1.
func cmdClient(ctx context.Context, cmd string, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet(cmd, stderr)
	conn := connectFlags(fs, "give up after this long")
	var (
		expected  = fs.Int64("expected-version", -1, "append: fail unless the entity is at this version (0: must not exist)")
		idemKey   = fs.String("idempotency-key", "", "append: retry-safe key")
		atVersion = fs.Int64("at-version", 0, "read: state at this version")
		atTime    = fs.String("at-time", "", "read: state at this RFC 3339 time")
		from      = fs.Int64("from", 1, "history: first version")
		limit     = fs.Int("limit", kuma.DefaultHistoryLimit, "history: events to print; the server's pages, cut by size too, are followed up to this many")
		outFile   = fs.String("out", "", "export: write to this file instead of stdout")
		reason    = fs.String("reason", "", "forget: why (kept in the audit log; no personal data)")
		yes       = fs.Bool("yes", false, "forget: do not ask for confirmation")
		field     = fs.String("field", "", "print only this top-level field of the reply, a string unquoted (for scripts: POS=$(kuma append ... --field position))")
	)
	pos, err := parse(fs, args, getenv)
	if err != nil {
		return helpOK(err)
	}
	want := map[string][2]int{"append": {2, 3}, "read": {1, 1}, "history": {1, 1}, "export": {1, 1}, "forget": {1, 1}}[cmd]
	if len(pos) < want[0] || len(pos) > want[1] {
		return usageError{fmt.Errorf("wrong number of arguments; see kuma --help")}
	}
	// A wrong --field is refused before the request: an append must not be
	// made only to find that its reply cannot be printed.
	if *field != "" && !slices.Contains(replyFields(cmd), *field) {
		return usageError{fmt.Errorf("--field %q: a %s reply has %s", *field, cmd, strings.Join(replyFields(cmd), ", "))}
	}
	ctx, cancel := context.WithTimeout(ctx, *conn.timeout)
	defer cancel()
	c, closeConn, err := conn.client()
	if err != nil {
		return err
	}
	defer closeConn()

	entity := pos[0]
	var out any
	switch cmd {
	case "append":
		data := json.RawMessage(`{}`)
		if len(pos) == 3 {
			if !json.Valid([]byte(pos[2])) {
				return usageError{fmt.Errorf("event data %q is not JSON", pos[2])}
			}
			data = json.RawMessage(pos[2])
		}
		var opts []client.AppendOption
		if *expected >= 0 {
			opts = append(opts, client.ExpectVersion(*expected))
		}
		if *idemKey != "" {
			opts = append(opts, client.IdempotencyKey(*idemKey))
		}
		out, err = c.Append(ctx, entity, []kuma.EventInput{{Type: pos[1], Data: data}}, opts...)
	case "read":
		var opts []client.ReadOption
		if *atVersion != 0 {
			opts = append(opts, client.AtVersion(*atVersion))
		}
		if *atTime != "" {
			t, perr := time.Parse(time.RFC3339Nano, *atTime)
			if perr != nil {
				return usageError{fmt.Errorf("--at-time %q: want RFC 3339, e.g. 2026-11-25T14:03:07Z", *atTime)}
			}
			opts = append(opts, client.AtTime(t))
		}
		out, err = c.Read(ctx, entity, opts...)
	case "history":
		out, err = c.History(ctx, entity, *from, *limit)
	case "export":
		out, err = c.Export(ctx, entity)
	case "forget":
		if !*yes {
			fmt.Fprintf(stderr, "This erases %q for good: its key is destroyed and its events deleted.\nType the entity id to confirm: ", entity)
			line, _ := bufio.NewReader(stdin).ReadString('\n')
			if strings.TrimSpace(line) != entity {
				return usageError{errors.New("not confirmed; nothing was forgotten")}
			}
		}
		out, err = c.Forget(ctx, entity, *reason, requester(getenv))
	}
	if *field != "" && err == nil {
		return printField(out, *field, stdout)
	}
	if *outFile == "" || err != nil {
		return printReply(out, err, stdout, stderr)
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	// The export is personal data: readable by its owner only.
	return os.WriteFile(*outFile, append(b, '\n'), 0o600)
}

// replyFields are the top-level JSON fields of a command's reply, the
// names --field accepts.
func replyFields(cmd string) []string {
	switch cmd {
	case "append":
		return jsonFields(kuma.AppendReply{})
	case "read":
		return jsonFields(kuma.ReadReply{})
	case "history":
		return jsonFields(kuma.HistoryReply{})
	case "export":
		return jsonFields(kuma.ExportReply{})
	case "forget":
		return jsonFields(kuma.ForgetReply{})
	}
	return nil
}

// jsonFields lists the JSON names of a struct's fields.
func jsonFields(v any) []string {
	t := reflect.TypeOf(v)
	var names []string
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			names = append(names, name)
		}
	}
	return names
}

// printField prints one field of a reply: a string as its text (what a
// shell variable wants), anything else as JSON; an absent field (omitted
// when empty) prints as null.
func printField(out any, name string, stdout io.Writer) error {
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	v, ok := fields[name]
	if !ok {
		v = json.RawMessage("null")
	}
	var s string
	if json.Unmarshal(v, &s) == nil {
		_, err = fmt.Fprintln(stdout, s)
		return err
	}
	_, err = fmt.Fprintln(stdout, string(v))
	return err
}

// requester names the CLI's user for the audit log: user@host.
func requester(getenv func(string) string) string {
	user := getenv("USER")
	if user == "" {
		user = "unknown"
	}
	host, _ := os.Hostname()
	return user + "@" + host + " (kuma cli)"
}

// connection is the flags every client command has, and what they connect.
type connection struct {
	natsURL, ctxName *string
	timeout          *time.Duration
	auth             *app.Config // only its NATS credential and TLS fields
}

// connectFlags registers --nats-url, --context, --timeout and the NATS
// credential and TLS flags.
func connectFlags(fs *flag.FlagSet, timeoutUsage string) connection {
	return connectFlagsTimeout(fs, timeoutUsage, 10*time.Second)
}

// connectFlagsTimeout is connectFlags with another default --timeout.
func connectFlagsTimeout(fs *flag.FlagSet, timeoutUsage string, timeout time.Duration) connection {
	c := connection{
		natsURL: fs.String("nats-url", app.DefaultNATSURL, "NATS server"),
		ctxName: fs.String("context", kuma.DefaultContext, "Kuma context"),
		timeout: fs.Duration("timeout", timeout, timeoutUsage),
		auth:    &app.Config{},
	}
	c.auth.RegisterNATSAuthFlags(fs)
	return c
}

// client connects to NATS and returns a Go client and the way to close it.
func (c connection) client() (*client.Client, func(), error) {
	nc, cl, err := c.connect()
	if err != nil {
		return nil, nil, err
	}
	return cl, nc.Close, nil
}

// connect is client with the connection itself, for commands that use
// JetStream too; the caller closes it.
func (c connection) connect() (*nats.Conn, *client.Client, error) {
	auth, err := c.auth.NATSOptions()
	if err != nil {
		return nil, nil, usageError{err}
	}
	nc, err := nats.Connect(*c.natsURL, append([]nats.Option{nats.Name("kuma-cli"), nats.Timeout(*c.timeout)}, auth...)...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w (is `kuma up` running?)", *c.natsURL, err)
	}
	cl, err := client.New(nc, client.Options{Context: *c.ctxName, Timeout: *c.timeout})
	if err != nil {
		nc.Close()
		return nil, nil, usageError{err}
	}
	return nc, cl, nil
}
