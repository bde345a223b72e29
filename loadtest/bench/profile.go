package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"time"
)

// nodeProcess tells whether this run starts `kuma up` in a process of its own.
func (c config) nodeProcess() bool { return c.natsURL == "" && c.node == "process" }

// startCPUProfile starts a CPU profile of this process written to path (none
// when empty) and returns what stops it.
func startCPUProfile(path string) (func() error, error) {
	if path == "" {
		return func() error { return nil }, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	return func() error {
		pprof.StopCPUProfile()
		return f.Close()
	}, nil
}

// profileNode asks the node (run with --pprof) for a CPU profile of the next
// window and writes it to path; the returned function waits for it. The
// window is fixed because Go's profile endpoint only stops at its end: a
// window longer than the run also holds the catching up after it.
func profileNode(ctx context.Context, metricsAddr, path string, window time.Duration) func() error {
	done := make(chan error, 1)
	go func() {
		secs := max(1, int(window.Round(time.Second).Seconds()))
		done <- fetchProfile(ctx, "http://"+metricsAddr+"/debug/pprof/profile?seconds="+strconv.Itoa(secs), path)
	}()
	return func() error { return <-done }
}

// writeHeapProfile writes the node's heap profile after a collection, taken
// through /debug/pprof when the node is another process (metricsAddr set),
// from this process otherwise.
func writeHeapProfile(ctx context.Context, metricsAddr, path string) error {
	if metricsAddr != "" {
		return fetchProfile(ctx, "http://"+metricsAddr+"/debug/pprof/heap?gc=1", path)
	}
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func fetchProfile(ctx context.Context, url, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("profile: %s answered %s: %s (was the node started with --pprof?)", url, resp.Status, msg)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("profile: %w", err)
	}
	return f.Close()
}
