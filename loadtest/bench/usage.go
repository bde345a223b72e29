package bench

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// usage is the CPU and memory a node used over a run.
type usage struct {
	CPUSeconds float64 `json:"cpu_seconds"`
	// CPUCores is CPU seconds over wall seconds (the run and the catching
	// up after it): 2.0 is two cores busy.
	CPUCores float64 `json:"cpu_cores"`
	// RSSBytes is the resident memory at the end (embedded: the peak).
	RSSBytes int64 `json:"rss_bytes"`
	// Note says what was measured.
	Note string `json:"note"`
}

func (u *usage) String() string {
	return fmt.Sprintf("%.1f CPU seconds (%.2f cores), %d MiB resident (%s)", u.CPUSeconds, u.CPUCores, u.RSSBytes>>20, u.Note)
}

type sample struct {
	at   time.Time
	cpu  float64
	rss  int64
	note string
}

// since is the usage from b to a (the run and the catching up after it).
func (a *sample) since(b *sample) *usage {
	cpu := a.cpu - b.cpu
	return &usage{CPUSeconds: cpu, CPUCores: cpu / a.at.Sub(b.at).Seconds(), RSSBytes: a.rss, Note: a.note}
}

// meter returns a sample now and a function that takes the next one. An
// embedded node shares this process, so its figures include the load
// generator's own work; a remote node is measured through its /metrics.
func (c config) meter(natsURL string) (*sample, func() (*sample, error)) {
	take := func() (*sample, error) { return rusage() }
	if c.natsURL != "" {
		if c.metricsURL == "" {
			return nil, func() (*sample, error) {
				return nil, fmt.Errorf("give --metrics-url with --nats-url")
			}
		}
		take = func() (*sample, error) { return scrapeUsage(c.metricsURL) }
	}
	before, err := take()
	if err != nil {
		return nil, func() (*sample, error) { return nil, err }
	}
	return before, take
}

func rusage() (*sample, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return nil, err
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return &sample{at: time.Now(), cpu: tv(ru.Utime) + tv(ru.Stime), rss: ru.Maxrss * 1024,
		note: "embedded node and load generator in one process, peak resident"}, nil
}

func scrapeUsage(addr string) (*sample, error) {
	resp, err := http.Get("http://" + strings.TrimPrefix(addr, "http://") + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, err
	}
	get := func(name string) (float64, error) {
		f := families[name]
		if f == nil || len(f.Metric) == 0 {
			return 0, fmt.Errorf("%s has no %s", addr, name)
		}
		m := f.Metric[0]
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), nil
		case m.Gauge != nil:
			return m.Gauge.GetValue(), nil
		}
		return 0, fmt.Errorf("%s: %s is neither counter nor gauge", addr, name)
	}
	cpu, err := get("process_cpu_seconds_total")
	if err != nil {
		return nil, err
	}
	rss, err := get("process_resident_memory_bytes")
	if err != nil {
		return nil, err
	}
	return &sample{at: time.Now(), cpu: cpu, rss: int64(rss), note: "the node's process, from its /metrics"}, nil
}

// progressBar is a live bar of acknowledged events (mpb); nil draws nothing.
type progressBar struct {
	p   *mpb.Progress
	bar *mpb.Bar
}

func newProgressBar(w io.Writer, total int64) *progressBar {
	p := mpb.New(mpb.WithOutput(w), mpb.WithWidth(40), mpb.WithRefreshRate(200*time.Millisecond))
	bar := p.AddBar(total,
		mpb.PrependDecorators(decor.Name("events "), decor.CountersNoUnit("%d / %d")),
		mpb.AppendDecorators(decor.AverageSpeed(0, " %.0f/s"), decor.Name("  "), decor.Percentage()),
	)
	return &progressBar{p: p, bar: bar}
}

func (b *progressBar) add(n int64) {
	if b != nil {
		b.bar.IncrInt64(n)
	}
}

// done completes the bar (an append that failed leaves it short) and waits
// for its last drawing.
func (b *progressBar) done() {
	if b == nil {
		return
	}
	b.bar.SetTotal(-1, true)
	b.p.Wait()
}
