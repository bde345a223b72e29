package natsbus

import (
	"flag"
	"fmt"
	"strconv"
	"strings"
)

// Defaults of the embedded server's settings that are flags: setDefaults
// fills them in and the flags show them, so the two never disagree.
const (
	DefaultListen      = "127.0.0.1:4222"
	DefaultClusterName = "kuma"
	// DefaultMaxPayload is 8 MiB, so that a batch of 100 events of 64 KiB
	// fits.
	DefaultMaxPayload = 8 << 20
)

// RegisterFlags registers the settings of the embedded server an operator
// sets as flags of fs (kuma up, kuma serve --target nats): where it
// listens, its largest message, and the NATS cluster it joins
// (docs/cluster.md). A new setting is a field, its default in setDefaults
// and its flag here; the process hands the ServerConfig over whole. Like
// every flag, each has its KUMA_* variable; --join's takes a
// comma-separated list.
func (c *ServerConfig) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "nats-listen", DefaultListen, "host:port of the embedded NATS server (kuma up, kuma serve --target nats)")
	fs.Func("max-payload", "largest NATS message in bytes of the embedded server (default 8 MiB); larger answers are paged or refused with payload_too_large", func(v string) error {
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil {
			return fmt.Errorf("want a number of bytes, got %q", v)
		}
		c.MaxPayload = int32(n)
		return nil
	})
	fs.Func("join", "route URL nats://host:port of a running cluster member to join; repeat it or separate URLs by commas (see docs/cluster.md)", func(v string) error {
		// Blanks trimmed and empty items dropped, so that KUMA_JOIN=a, b,
		// is the list a and b.
		for _, route := range strings.Split(v, ",") {
			if route = strings.TrimSpace(route); route != "" {
				c.Routes = append(c.Routes, route)
			}
		}
		return nil
	})
	fs.StringVar(&c.ClusterListen, "cluster-listen", "", "host:port for the other cluster members' routes (empty: not a cluster member); needs --insecure unless loopback")
	fs.StringVar(&c.ClusterAdvertise, "cluster-advertise", "", "host:port the other members dial for this one when they learn of it by gossip (default: the address its routes come from, with the --cluster-listen port); for NAT, published container ports or proxies")
	fs.StringVar(&c.ClusterName, "cluster-name", DefaultClusterName, "NATS cluster name, the same on every member")
}
