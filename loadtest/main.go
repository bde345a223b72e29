// Command loadtest is Kuma's load test (also `kuma bench`); see package
// loadtest/bench and loadtest/README.md.
//
//	go run ./loadtest                       # the seed's benchmark on an embedded node
//	go run ./loadtest --baseline sqlite     # and raw SQLite, same workload
package main

import (
	"context"
	"os"
	"os/signal"

	"github.com/kumadb/kuma/loadtest/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := bench.Main(ctx, "loadtest", os.Args[1:], bench.Options{}, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
