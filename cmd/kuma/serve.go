package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/kumadb/kuma/pkg/telemetry"
)

// processFlags are the flags of the process itself, which kuma up and kuma
// serve share: its log and its memory limit. The rest of their flags are the
// app's (app.Config's RegisterUpFlags and RegisterServeFlags).
type processFlags struct {
	logLevel, logFormat string
	memoryLimitRatio    float64
	procsPerCPU         int
}

func (p *processFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&p.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&p.logFormat, "log-format", "auto", "text, json, or auto (text on a terminal, JSON otherwise)")
	fs.Float64Var(&p.memoryLimitRatio, "memory-limit-ratio", defaultMemoryLimitRatio,
		"share of the container's (cgroup's) memory limit that Go's heap may fill before the collector works harder (sets GOMEMLIMIT; 0: off; a GOMEMLIMIT in the environment wins)")
	fs.IntVar(&p.procsPerCPU, "procs-per-cpu", defaultProcsPerCPU,
		"Go processors (GOMAXPROCS) per CPU of the machine or container, since much of a node's time is spent waiting on fsync (1: Go's default; a GOMAXPROCS in the environment wins)")
}

// secretsAndHooks fills what comes only from the environment: the master key
// itself (never a flag: flags show in ps) and the fault tests' failpoint,
// which says on stderr where it struck.
func secretsAndHooks(cfg *app.Config, getenv func(string) string, stderr io.Writer) error {
	// OTLP export is on when the standard variables point somewhere.
	if cfg.Tracing == telemetry.ExportNone && getenv("OTEL_SDK_DISABLED") != "true" &&
		(getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" || getenv("OTEL_TRACES_EXPORTER") == "otlp") {
		cfg.Tracing = telemetry.ExportOTLP
	}
	if k := getenv("KUMA_MASTER_KEY"); k != "" && cfg.MasterKeyFile == "" {
		key, err := app.DecodeMasterKey(strings.TrimSpace(k))
		if err != nil {
			return usageError{fmt.Errorf("KUMA_MASTER_KEY: %w", err)}
		}
		cfg.MasterKey = key
	}
	// KUMA_TEST_FAILPOINT=name makes the process kill itself when it
	// reaches that point the first time, and name@N the Nth time, so that
	// fault tests land at different moments of a busy run. For fault tests
	// only.
	//
	// SIGKILL, not a panic: a panic unwinds its goroutine and runs the
	// deferred calls on the way (a rollback, an unlock, a close; a recover
	// could even swallow it), while a kill runs nothing at all, like a crash
	// or the OOM killer. That is the harsher case for recovery.
	if fp := getenv("KUMA_TEST_FAILPOINT"); fp != "" {
		point, nth, err := parseFailpoint(fp)
		if err != nil {
			return usageError{err}
		}
		var hits atomic.Int64
		cfg.Failpoint = func(name string) {
			if name == point && hits.Add(1) == nth {
				fmt.Fprintf(stderr, "kuma: failpoint %s reached (hit %d): SIGKILL\n", name, nth)
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {} // the signal is on its way
			}
		}
	}
	return nil
}

// parseFailpoint reads KUMA_TEST_FAILPOINT: name, or name@N (N ≥ 1).
func parseFailpoint(v string) (name string, nth int64, err error) {
	name, n, found := strings.Cut(v, "@")
	nth = 1
	if found {
		nth, err = strconv.ParseInt(n, 10, 64)
		if err != nil || nth < 1 {
			return "", 0, fmt.Errorf("KUMA_TEST_FAILPOINT=%q: want name or name@N with N a whole number from 1", v)
		}
	}
	if name == "" {
		return "", 0, fmt.Errorf("KUMA_TEST_FAILPOINT=%q: the point's name is empty", v)
	}
	return name, nth, nil
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", level)}
	}
	opts := &slog.HandlerOptions{Level: l, ReplaceAttr: durationText}
	if format == "auto" {
		format = "json"
		if isTerminal(w) {
			format = "text"
		}
	}
	switch format {
	case "text":
		return slog.New(telemetry.LogHandler(slog.NewTextHandler(w, opts))), nil
	case "json":
		return slog.New(telemetry.LogHandler(slog.NewJSONHandler(w, opts))), nil
	}
	return nil, usageError{fmt.Errorf("--log-format %q: want text, json or auto", format)}
}

// durationText writes a duration as people read it ("8ms"): slog's JSON
// handler writes its nanoseconds (8000000). Every logger is built here, so
// this one hook covers every duration any service logs.
func durationText(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.String(a.Key, a.Value.Duration().String())
	}
	return a
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func cmdUp(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("up", stderr)
	var cfg app.Config
	var pf processFlags
	cfg.RegisterUpFlags(fs)
	pf.register(fs)
	if _, err := parse(fs, args, getenv); err != nil {
		return helpOK(err)
	}
	// kuma up serves metrics and health by default (kuma serve only when asked).
	if !flagSet(fs, "metrics-listen") && getenv("KUMA_METRICS_LISTEN") == "" {
		cfg.MetricsListen = app.DefaultMetricsListen
	}
	// ... and the web console, which may change data only when it listens on
	// loopback (kuma serve's console is read-only).
	if !flagSet(fs, "console-listen") && getenv("KUMA_CONSOLE_LISTEN") == "" {
		cfg.Console.Listen = app.DefaultConsoleListen
	}
	// Only a console nobody on the network reaches may change data (forget
	// an entity, rebuild a projection).
	cfg.Console.AllowWrites = natsbus.LoopbackListen(cfg.Console.Listen)
	cfg.Target = app.TargetAll
	if err := secretsAndHooks(&cfg, getenv, stderr); err != nil {
		return err
	}
	return serve(ctx, cfg, pf, stderr, getenv)
}

func cmdServe(ctx context.Context, args []string, stderr io.Writer, getenv func(string) string) error {
	fs := newFlagSet("serve", stderr)
	var cfg app.Config
	var pf processFlags
	cfg.RegisterServeFlags(fs)
	pf.register(fs)
	if _, err := parse(fs, args, getenv); err != nil {
		return helpOK(err)
	}
	if cfg.Target == "" {
		return usageError{errors.New("--target is required: router, shardnode, projector, keyvault, console, nats or all")}
	}
	if err := secretsAndHooks(&cfg, getenv, stderr); err != nil {
		return err
	}
	return serve(ctx, cfg, pf, stderr, getenv)
}

func helpOK(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	return err
}

// serve runs an App until SIGINT or SIGTERM, then stops it: routers stop
// taking requests, shards finish in-flight commits and close their files.
func serve(ctx context.Context, cfg app.Config, pf processFlags, stderr io.Writer, getenv func(string) string) error {
	log, err := newLogger(stderr, pf.logLevel, pf.logFormat)
	if err != nil {
		return err
	}
	if err := applyMemoryLimit(ctx, pf.memoryLimitRatio, memlimit.FromCgroup, log); err != nil {
		return err
	}
	if err := applyProcs(ctx, pf.procsPerCPU, getenv("GOMAXPROCS") != "", log); err != nil {
		return err
	}
	cfg.Shardnode.Synchronous = strings.ToUpper(cfg.Shardnode.Synchronous)
	cfg.Logger = log
	a, err := app.New(cfg)
	if err != nil {
		return usageError{err}
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// A cluster member's start waits for the cluster's JetStream, and the
	// first member's for a second member to join, which takes what the
	// operator takes: it is bounded by SIGINT/SIGTERM only.
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	if cfg.NATS.Clustered() {
		cancel()
		startCtx, cancel = context.WithCancel(ctx)
	}
	err = a.Start(startCtx)
	cancel()
	if err != nil {
		return err
	}
	c := a.Config()
	consoleURL := ""
	if con := a.Console(); con != nil {
		consoleURL = con.URL()
	}
	// Ready means serving: a restarted node takes its shards back (and a
	// joining one receives its share) just after Start, and a client that
	// starts on this line should not meet those moments. A shard that does
	// not come (a damaged file) must not hold the line back for good.
	unserved := waitServed(ctx, a, 10*time.Second)
	log.Info("kuma ready", "target", c.Target, "nats", a.ClientURL(), "data", c.DataDir,
		"context", c.Context, "shards", a.Shards(), "sync", c.Shardnode.Synchronous, "metrics", a.MetricsAddr(),
		"console", consoleURL)
	if len(unserved) > 0 {
		log.Warn("shards placed on this node are not served yet", "shards", unserved)
	}
	<-ctx.Done()
	log.Info("kuma stopping")
	stopCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Stop(stopCtx); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	log.Info("kuma stopped")
	return nil
}

// waitServed waits, at most limit, until this process's shardnode (if it
// runs one) serves every shard placed on it, and returns those it does not.
func waitServed(ctx context.Context, a *app.App, limit time.Duration) []int {
	sn := a.Shardnode()
	if sn == nil {
		return nil
	}
	deadline := time.Now().Add(limit)
	for {
		missing := sn.Unserved(a.Config().Context)
		if len(missing) == 0 || time.Now().After(deadline) {
			return missing
		}
		select {
		case <-ctx.Done():
			return missing
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
