package natsbus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// ServerConfig configures the embedded NATS server of `kuma up`.
//
// Without ClusterListen and Routes the server is standalone, as a single
// `kuma up` has always been: JetStream answers at once and every stream has
// one replica. With either, it is a member of a NATS cluster with clustered
// JetStream, and the following holds (nats-server 2.15):
//
//   - JetStream needs a quorum of its meta group, and a new group expects at
//     least two members (raft.go, bootstrapRaftNode). So the first member,
//     started with ClusterListen and no Routes, serves plain NATS at once but
//     its JetStream does not (no reply for 10 s, then error 10008 "JetStream
//     system temporarily unavailable") until a second member joins it;
//     WaitJetStream waits for that. Later members join with Routes pointing
//     at any running member and gossip finds the rest; the meta leader adds
//     each to the group, which grows 2, 3, ...; from three on, a stream of
//     three replicas survives the loss of one server.
//   - A standalone store cannot be adopted by a clustered server: its
//     streams have no meta group assignment, so the cluster does not see
//     them and deletes them as orphans 30 s after a leader is elected
//     (jetstream_cluster.go, checkForOrphans; nats-server issue 5467). So
//     StartServer, asked to start clustered over a standalone store with no
//     Routes (the first member of a new cluster), exports its streams and
//     moves the store aside first, and RestoreExport brings them back once
//     the cluster's JetStream answers (standalone.go). With Routes it
//     refuses: the cluster joined has streams of its own. A cluster
//     listener is not on by default, since it would leave a lone `kuma up`
//     without JetStream until a second member joins.
//   - After a restart a member finds the cluster through its Routes, and
//     through the members whose Routes name it (they retry forever); give a
//     joining member every peer you know, so it is not cut off while the
//     one it names is down.
type ServerConfig struct {
	// Listen is host:port for clients (DefaultListen); port -1 picks a free
	// port (tests).
	Listen string
	// ServerName names this server: 1 to 64 of A-Z a-z 0-9 . _ -. A
	// standalone server defaults to "kuma". A cluster member must be given
	// one, unique in the cluster (its host name, say): JetStream tells its
	// peers apart by name, and nats-server refuses a route between two
	// servers of the same name, logging it only, so two members left at a
	// shared default would never form a cluster.
	ServerName string
	// ClusterName names the cluster (DefaultClusterName); every member must
	// use the same. Same characters as ServerName.
	ClusterName string
	// ClusterListen is host:port for routes from the other members. Empty,
	// with no Routes, is a standalone server. Port -1 picks a free port
	// (tests); read it back with the server's ClusterAddr. Members found by
	// gossip dial this one at the address its route connections come from,
	// with this port, so across hosts bind 0.0.0.0 or that interface, not
	// 127.0.0.1. The listener has no authentication, like the client one.
	ClusterListen string
	// Routes are route URLs of members to join (nats://host:port, the
	// `--join` values). Needs ClusterListen, so that the members found by
	// gossip can route back. Empty with ClusterListen set makes this server
	// the first member: it routes to itself, which nats-server ignores, but
	// which its clustered JetStream requires (a configured route).
	Routes []string
	// ClusterAdvertise is host:port that this member tells the others to
	// dial when they learn of it through gossip (nats-server's cluster
	// advertise). Empty: the address its route connections come from, with
	// the ClusterListen port. Set it when the members reach this one through
	// an address it does not see itself behind: NAT, a container's published
	// port, a proxy. Members that name each other in Routes dial those and
	// need no gossip.
	ClusterAdvertise string
	// StoreDir holds JetStream's files.
	StoreDir string
	// MaxPayload is the largest message in bytes (DefaultMaxPayload).
	MaxPayload int32
	// ReadyTimeout bounds the wait for the server to accept connections.
	ReadyTimeout time.Duration
	Logger       *slog.Logger
}

func (c *ServerConfig) setDefaults() {
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.ServerName == "" && !c.Clustered() {
		c.ServerName = "kuma"
	}
	if c.ClusterName == "" {
		c.ClusterName = DefaultClusterName
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = DefaultMaxPayload
	}
	if c.ReadyTimeout == 0 {
		c.ReadyTimeout = 10 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Clustered reports whether the config asks for a cluster member rather
// than a standalone server.
func (c ServerConfig) Clustered() bool { return c.ClusterListen != "" || len(c.Routes) > 0 }

// validName is what Kuma accepts as a server or cluster name: nats-server
// only refuses spaces, but names show up in subjects, logs and reports.
var validName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// Validate reports every problem of the config at once; empty fields are
// taken as their defaults.
func (c ServerConfig) Validate() error {
	var errs []error
	if c.Listen != "" {
		if _, _, err := splitListen(c.Listen, true); err != nil {
			errs = append(errs, fmt.Errorf("nats: listen address %w", err))
		}
	}
	if c.ServerName == "" && c.Clustered() {
		errs = append(errs, errors.New("nats: a cluster member needs a ServerName unique in the cluster, such as its host name"))
	}
	if c.ServerName != "" && !validName.MatchString(c.ServerName) {
		errs = append(errs, fmt.Errorf("nats: server name %q: want 1 to 64 of A-Z a-z 0-9 . _ - (a name unique in the cluster, such as the host name)", c.ServerName))
	}
	if c.ClusterName != "" && !validName.MatchString(c.ClusterName) {
		errs = append(errs, fmt.Errorf("nats: cluster name %q: want 1 to 64 of A-Z a-z 0-9 . _ - (the same on every member)", c.ClusterName))
	}
	if c.ClusterListen != "" {
		if _, _, err := splitListen(c.ClusterListen, false); err != nil {
			errs = append(errs, fmt.Errorf("nats: cluster listen address %w", err))
		}
	}
	if len(c.Routes) > 0 && c.ClusterListen == "" {
		errs = append(errs, errors.New("nats: routes (--join) need a cluster listener the other members can reach: set ClusterListen (--cluster-listen), e.g. 0.0.0.0:6222"))
	}
	for _, r := range c.Routes {
		if _, err := parseRoute(r); err != nil {
			errs = append(errs, err)
		}
	}
	if c.ClusterAdvertise != "" {
		if c.ClusterListen == "" {
			errs = append(errs, errors.New("nats: a cluster advertise address (--cluster-advertise) needs a cluster listener (--cluster-listen)"))
		}
		if _, port, err := splitListen(c.ClusterAdvertise, false); err != nil || port == -1 {
			errs = append(errs, fmt.Errorf("nats: cluster advertise address %q: want host:port that the other members reach, such as 10.0.0.1:6222", c.ClusterAdvertise))
		}
	}
	return errors.Join(errs...)
}

// splitListen parses host:port; port -1 means a free port. Port 0 means the
// default to nats-server for clients but "no cluster" for routes, so it is
// allowed only for clients.
func splitListen(addr string, allowZero bool) (string, int, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%q: want host:port, such as 127.0.0.1:6222 (%v)", addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < -1 || port > 65535 || (port == 0 && !allowZero) {
		return "", 0, fmt.Errorf("%q: bad port %q: want 1 to 65535, or -1 for a free one", addr, portStr)
	}
	return host, port, nil
}

// parseRoute checks one route URL: nats://host:port, port required, since
// a route on the client port 4222 would fail in confusing ways.
func parseRoute(r string) (*url.URL, error) {
	u, err := url.Parse(r)
	if err != nil {
		return nil, fmt.Errorf("nats: route %q: %v (want nats://host:port)", r, err)
	}
	if u.Scheme != "nats" {
		return nil, fmt.Errorf("nats: route %q: want scheme nats://, as in nats://10.0.0.1:6222", r)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("nats: route %q: no host: want nats://host:port", r)
	}
	if u.Port() == "" {
		return nil, fmt.Errorf("nats: route %q: no port: want the peer's cluster port, as in nats://%s:6222", r, u.Hostname())
	}
	if p, err := strconv.Atoi(u.Port()); err != nil || p < 1 || p > 65535 {
		return nil, fmt.Errorf("nats: route %q: bad port %q", r, u.Port())
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("nats: route %q: want only nats://host:port", r)
	}
	return u, nil
}

// StartServer starts an embedded nats-server with JetStream on and waits
// until it accepts connections; see ServerConfig for standalone and
// clustered servers. A clustered server's JetStream may answer only later
// (WaitJetStream). The caller stops it with Shutdown and WaitForShutdown.
func StartServer(ctx context.Context, cfg ServerConfig) (*server.Server, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	host, port, _ := splitListen(cfg.Listen, true)
	opts := &server.Options{
		ServerName: cfg.ServerName,
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   cfg.StoreDir,
		MaxPayload: cfg.MaxPayload,
		// A publish ack from JetStream must mean the message is on disk:
		// the stream is Kuma's replica and outbox, not a cache.
		SyncAlways:   true,
		SyncInterval: 2 * time.Minute,
		// The server's own signal handling would fight ours.
		NoSigs: true,
	}
	if cfg.Clustered() {
		if err := convertStandalone(ctx, cfg); err != nil {
			return nil, err
		}
		if err := clusterOptions(opts, cfg); err != nil {
			return nil, err
		}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats: %w", err)
	}
	log := &slogAdapter{l: cfg.Logger.With("component", "nats-server"), fatal: make(chan string, 1)}
	srv.SetLoggerV2(log, false, false, false)
	go srv.Start()
	deadline := cfg.ReadyTimeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) < deadline {
		deadline = time.Until(d)
	}
	// nats-server reports a failed start (JetStream that cannot start, for
	// one) only through the logger's Fatalf and then never becomes ready, so
	// watch both.
	for end := time.Now().Add(deadline); !srv.ReadyForConnections(50 * time.Millisecond); {
		select {
		case msg := <-log.fatal:
			srv.Shutdown()
			return nil, fmt.Errorf("nats: server on %s: %s", cfg.Listen, msg)
		default:
		}
		if time.Now().After(end) {
			srv.Shutdown()
			if cfg.Clustered() {
				return nil, fmt.Errorf("nats: server on %s (cluster %s) not ready after %s (is a port in use?)", cfg.Listen, cfg.ClusterListen, deadline)
			}
			return nil, fmt.Errorf("nats: server on %s not ready after %s (is the port in use?)", cfg.Listen, deadline)
		}
	}
	return srv, nil
}

// clusterOptions makes opts a cluster member with clustered JetStream.
func clusterOptions(opts *server.Options, cfg ServerConfig) error {
	host, port, _ := splitListen(cfg.ClusterListen, false)
	routes := make([]*url.URL, 0, len(cfg.Routes)+1)
	for _, r := range cfg.Routes {
		u, _ := parseRoute(r)
		routes = append(routes, u)
	}
	if len(routes) == 0 {
		// The first member: clustered JetStream wants a configured route,
		// and a route to oneself is recognised and dropped by nats-server.
		if port == -1 {
			p, err := freePort(host)
			if err != nil {
				return err
			}
			port = p
		}
		routes = append(routes, &url.URL{Scheme: "nats", Host: net.JoinHostPort(dialHost(host), strconv.Itoa(port))})
	}
	opts.Cluster = server.ClusterOpts{Name: cfg.ClusterName, Host: host, Port: port, Advertise: cfg.ClusterAdvertise}
	opts.Routes = routes
	return nil
}

// convertStandalone exports a standalone store under cfg.StoreDir before
// the server starts clustered over it (see exportStandalone), or refuses
// when that cannot be done safely.
func convertStandalone(ctx context.Context, cfg ServerConfig) error {
	dir, err := standaloneStreams(cfg.StoreDir)
	if err != nil || dir == "" {
		return err
	}
	if len(cfg.Routes) > 0 {
		// The cluster joined has streams of its own (the same names:
		// KUMA_<context>, the leases), which these cannot be merged into.
		return fmt.Errorf("nats: %s holds the JetStream store of a standalone node (%s), which cannot join a cluster that has streams of its own: start this node with --cluster-listen and no --join, so that it becomes the first member of a new cluster with its data, and join the other nodes to it", cfg.StoreDir, dir)
	}
	if acc := filepath.Base(filepath.Dir(filepath.Dir(dir))); acc != server.DEFAULT_GLOBAL_ACCOUNT {
		return fmt.Errorf("nats: %s holds streams in account %s; only an embedded server's store (account %s) can be carried into a cluster", cfg.StoreDir, acc, server.DEFAULT_GLOBAL_ACCOUNT)
	}
	cfg.Logger.Info("this node ran standalone: carrying its JetStream streams into the new cluster (export now, restore once a second member joins)", "store", cfg.StoreDir)
	return exportStandalone(ctx, cfg)
}

// dialHost is where to reach a listener bound to host on this machine.
func dialHost(host string) string {
	switch ip := net.ParseIP(host); {
	case host == "":
		return "127.0.0.1"
	case ip != nil && ip.IsUnspecified() && ip.To4() != nil:
		return "127.0.0.1"
	case ip != nil && ip.IsUnspecified():
		return "::1"
	}
	return host
}

// freePort asks the kernel for a free port on host. Another process may
// take it before nats-server listens on it; StartServer then fails with
// "not ready", which only tests (port -1) can meet.
func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("nats: free cluster port on %q: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// standaloneStreams returns a stream directory under storeDir if storeDir
// holds streams and was never part of a cluster (no meta group state),
// else "". The layout is nats-server's: jetstream/<account>/streams/<name>
// and jetstream/<system account>/_js_/_meta_.
func standaloneStreams(storeDir string) (string, error) {
	if storeDir == "" {
		return "", nil
	}
	jsDir := filepath.Join(storeDir, server.JetStreamStoreDir)
	accounts, err := os.ReadDir(jsDir)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("nats: store dir: %w", err)
	}
	var found string
	for _, acc := range accounts {
		if !acc.IsDir() {
			continue
		}
		if _, err := os.Stat(filepath.Join(jsDir, acc.Name(), "_js_", "_meta_")); err == nil {
			return "", nil // clustered before: the meta group knows its streams
		}
		streams, err := os.ReadDir(filepath.Join(jsDir, acc.Name(), "streams"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("nats: store dir: %w", err)
		}
		if len(streams) > 0 && found == "" {
			found = filepath.Join(jsDir, acc.Name(), "streams", streams[0].Name())
		}
	}
	return found, nil
}

// slogAdapter sends nats-server's log lines to slog, and hands the first
// fatal one to StartServer.
type slogAdapter struct {
	l     *slog.Logger
	fatal chan string
}

func (a *slogAdapter) Noticef(format string, v ...any) { a.l.Debug(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Warnf(format string, v ...any)   { a.l.Warn(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	a.l.Error(msg)
	select {
	case a.fatal <- msg:
	default:
	}
}
func (a *slogAdapter) Errorf(format string, v ...any) { a.l.Error(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Debugf(format string, v ...any) { a.l.Debug(fmt.Sprintf(format, v...)) }
func (a *slogAdapter) Tracef(format string, v ...any) {}

// LoopbackHost reports whether host (a name or an address, IPv6 in
// brackets or not) is this machine's loopback: localhost, 127.0.0.0/8, ::1.
func LoopbackHost(host string) bool {
	host = strings.Trim(host, "[]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// LoopbackListen reports whether a listen address host:port is reachable
// from this machine only. What listens elsewhere without authentication
// (the embedded NATS server, its cluster routes) needs the operator's
// --insecure; kuma up's web console, which has no authentication either,
// may change data only when it listens on loopback.
func LoopbackListen(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	return err == nil && LoopbackHost(host)
}
