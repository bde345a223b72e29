// Command kuma is Kuma's one binary: `kuma up` runs a whole node in one
// process, `kuma serve --target ...` runs one service against an external
// NATS, and the client commands talk to a running Kuma.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/kumadb/kuma/loadtest/bench"
)

const usage = `kuma: an entity-native, event-sourced store over NATS and SQLite

Usage:
  kuma up [flags]                       run everything in one process (embedded NATS)
  kuma serve --target T [flags]         run one service (router, shardnode, projector, keyvault, console) against --nats-url,
                                        or the embedded NATS server alone (--target nats, with up's cluster flags)
  kuma append ENTITY TYPE [JSON]        append one event (JSON defaults to {})
  kuma read ENTITY [--at-version N | --at-time T]
  kuma history ENTITY [--from N] [--limit N]
  kuma export ENTITY [--out FILE]
  kuma forget ENTITY --reason TEXT [--yes]   erase the entity (asks to confirm)
  kuma subscribe [--after CURSOR | --from-start | --from-end] [--prefix P] [--type T]... [--cursor-file F]
                                        follow the events as JSON lines, catch-up then live (Ctrl-C stops)
  kuma query PROJECTION [--query NAME] [--param K=JSON]... [--where K=JSON]... [--prefix P] [--after POS]
  kuma projection rebuild NAME          rebuild a read model beside the live one (progress bar)
  kuma projection retry NAME            try the event a stopped projection failed on again
  kuma projection skip NAME POSITION    skip that event (recorded)
  kuma projection drop NAME             remove what a projection no longer declared left behind
  kuma status                           shards, nodes and projections
  kuma migrate --shard N --to NODE [--wait 30s] [--unpin]   move a shard to a node (a pin; --unpin drops it)
  kuma bench [--events N] [--baseline sqlite] [--verify] [--rate R] ...   the load test (see loadtest/README.md)
  kuma backup DIR                       copy the shard files and the keyvault, online, into a new directory
                                        (the master key is never in it; read models are rebuilt, not copied)
  kuma restore --from DIR --data D [--master-key-file F] [--tombstones FILE]
                                        offline, into an empty data dir; checks every checksum and the master key;
                                        --tombstones forgets again what was forgotten after the backup
  kuma keyvault rotate --data DIR --master-key-file OLD --new-master-key-file NEW
  kuma keyvault tombstones > FILE       the live keyvault's forgotten ids (by pseudonym), for restore --tombstones
  kuma version

Every flag has a KUMA_* environment equivalent (--nats-url → KUMA_NATS_URL);
flags win over the environment. append, read, history, export and forget take
--field NAME to print one field of the reply (POS=$(kuma append ... --field position)).
Run "kuma COMMAND --help" for a command's flags.
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv))
}

// run is main without the process: tests call it directly.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "up":
		err = cmdUp(ctx, rest, stderr, getenv)
	case "serve":
		err = cmdServe(ctx, rest, stderr, getenv)
	case "append", "read", "history", "export", "forget":
		err = cmdClient(ctx, cmd, rest, stdin, stdout, stderr, getenv)
	case "subscribe":
		err = cmdSubscribe(ctx, rest, stdout, stderr, getenv)
	case "query", "projection", "status":
		err = cmdProjection(ctx, cmd, rest, stdout, stderr, getenv)
	case "migrate":
		err = cmdMigrate(ctx, rest, stdout, stderr, getenv)
	case "backup":
		err = cmdBackup(ctx, rest, stdout, stderr, getenv)
	case "restore":
		err = cmdRestore(ctx, rest, stdout, stderr, getenv)
	case "keyvault":
		err = cmdKeyvault(ctx, rest, stdout, stderr, getenv)
	case "bench":
		self, _ := os.Executable()
		return bench.Main(ctx, "kuma bench", rest, bench.Options{KumaBinary: self}, stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "kuma", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "kuma: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err == nil {
		return 0
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "kuma %s: %v\n", cmd, err)
		return 2
	}
	var ex exitError
	if errors.As(err, &ex) {
		return ex.code
	}
	fmt.Fprintf(stderr, "kuma %s: %v\n", cmd, err)
	return 1
}

// usageError is a mistake in the command line (exit 2).
type usageError struct{ error }

// exitError carries an exit code for an error already reported.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }
