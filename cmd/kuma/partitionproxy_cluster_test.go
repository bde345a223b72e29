//go:build cluster

package main

import (
	"context"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// routeProxy forwards one node's route connections to another node's
// cluster listener. Cut, it closes every connection it carries and drops
// new ones at once; healed, it forwards again. Safe for concurrent use.
type routeProxy struct {
	from, to string
	target   string // the destination's cluster listener
	ln       net.Listener
	mu       sync.Mutex
	cut      bool
	conns    map[net.Conn]bool
}

func (p *routeProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed at the end of the test
		}
		go p.forward(c)
	}
}

func (p *routeProxy) forward(in net.Conn) {
	p.mu.Lock()
	cut := p.cut
	p.mu.Unlock()
	if cut {
		_ = in.Close()
		return
	}
	out, err := net.DialTimeout("tcp", p.target, 2*time.Second)
	if err != nil {
		_ = in.Close()
		return
	}
	p.mu.Lock()
	if p.cut { // cut while dialing
		p.mu.Unlock()
		_ = in.Close()
		_ = out.Close()
		return
	}
	p.conns[in], p.conns[out] = true, true
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	_ = in.Close()
	_ = out.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, in)
	delete(p.conns, out)
	p.mu.Unlock()
}

func (p *routeProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			_ = c.Close()
		}
	}
}

// routeNet is the test's network between the nodes: the pair proxies and
// the address every node advertises. Nothing listens there, so a dial that
// gossip sends there is refused and, being a gossip route, not tried again
// (a listener that accepted and closed would have it redialled forever).
type routeNet struct {
	t         *testing.T
	mu        sync.Mutex
	proxies   []*routeProxy
	advertise string
}

func newRouteNet(t *testing.T) *routeNet {
	return &routeNet{t: t, advertise: "127.0.0.1:" + strconv.Itoa(freePort(t))}
}

// route starts the proxy carrying from's routes to to and returns its URL.
func (rn *routeNet) route(from, to *clusterNode) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		rn.t.Fatal(err)
	}
	p := &routeProxy{from: from.name, to: to.name, target: "127.0.0.1:" + strconv.Itoa(to.routePort), ln: ln, conns: map[net.Conn]bool{}}
	rn.t.Cleanup(func() {
		_ = ln.Close()
		p.setCut(true)
	})
	go p.serve()
	rn.mu.Lock()
	rn.proxies = append(rn.proxies, p)
	rn.mu.Unlock()
	return "nats://" + ln.Addr().String()
}

// cutOff cuts (or, with cut false, heals) every route to and from node.
func (rn *routeNet) cutOff(node string, cut bool) {
	rn.mu.Lock()
	defer rn.mu.Unlock()
	for _, p := range rn.proxies {
		if p.from == node || p.to == node {
			p.setCut(cut)
		}
	}
}

// peersSeen waits until the servers that nc's server reaches over routes
// number want (the account STATZ ping travels the routes), for up to limit;
// it returns the last count.
func peersSeen(nc *nats.Conn, want int, limit time.Duration) int {
	deadline := time.Now().Add(limit)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		n, _ := natsbus.JetStreamPeers(ctx, nc)
		cancel()
		if n == want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(200 * time.Millisecond)
	}
}
