package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// node is a `kuma up` the load test started in a process of its own, so that
// its CPU and memory are measured apart from the load generator's (they still
// share the machine's cores).
type node struct {
	cmd         *exec.Cmd
	dir         string
	natsURL     string
	metricsAddr string
	exited      chan struct{}
	lastLines   []string // of its stderr, for an error
}

func startNode(ctx context.Context, c config, out io.Writer) (*node, error) {
	if c.kumaBinary == "" {
		return nil, fmt.Errorf("--node process needs the kuma binary: run `kuma bench`, or use --node embedded")
	}
	dir, err := os.MkdirTemp("", "kuma-bench-")
	if err != nil {
		return nil, err
	}
	natsPort, err := freePort()
	if err != nil {
		return nil, err
	}
	metricsPort, err := freePort()
	if err != nil {
		return nil, err
	}
	n := &node{dir: dir, natsURL: "nats://127.0.0.1:" + strconv.Itoa(natsPort),
		metricsAddr: "127.0.0.1:" + strconv.Itoa(metricsPort), exited: make(chan struct{})}
	n.cmd = exec.Command(c.kumaBinary, "up", "--data", dir, "--shards", strconv.Itoa(c.shards), "--sync", c.sync,
		"--context", c.ctxName, "--nats-listen", "127.0.0.1:"+strconv.Itoa(natsPort),
		"--metrics-listen", n.metricsAddr, "--log-format", "text", "--log-level", "warn")
	if c.cpuProfile != "" || c.heapProfile != "" {
		n.cmd.Args = append(n.cmd.Args, "--pprof")
	}
	stderr, err := n.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := n.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start %s up: %w", c.kumaBinary, err)
	}
	go func() {
		// Keep the pipe drained; keep the last lines for an error.
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			n.lastLines = append(n.lastLines, sc.Text())
			if len(n.lastLines) > 5 {
				n.lastLines = n.lastLines[1:]
			}
		}
		_ = n.cmd.Wait()
		close(n.exited)
	}()
	// Ready when its NATS port and metrics answer.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if ready(n.metricsAddr) {
			break
		}
		select {
		case <-n.exited:
			os.RemoveAll(dir)
			return nil, fmt.Errorf("kuma up exited before it was ready:\n%s", strings.Join(n.lastLines, "\n"))
		case <-ctx.Done():
			n.stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			n.stop()
			return nil, fmt.Errorf("kuma up was not ready within a minute")
		}
	}
	fmt.Fprintf(out, "node: kuma up (pid %d), %d shards, synchronous=%s, data in %s\n", n.cmd.Process.Pid, c.shards, c.sync, dir)
	return n, nil
}

// ready tells whether the node answers /readyz.
func ready(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	fmt.Fprintf(conn, "GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
	line, err := bufio.NewReader(conn).ReadString('\n')
	return err == nil && strings.Contains(line, " 200 ")
}

// stop ends the node with SIGTERM (a clean stop) and removes its data.
func (n *node) stop() {
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(30 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.exited
	}
	os.RemoveAll(n.dir)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
