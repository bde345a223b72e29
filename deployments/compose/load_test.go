//go:build docker

package compose

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// load is a few writers appending one event at a time to their own
// entities, each event {"i": i} for the i-th append of that entity, with
// the client's retries (one idempotency key per append). It counts what
// failed outright.
type load struct {
	c        *client.Client
	stop     chan struct{}
	wg       sync.WaitGroup
	ok, fail atomic.Int64
	mu       sync.Mutex
	acked    map[string]int64 // entity → acknowledged appends
	errs     []string
}

func startLoad(c *client.Client, writers int, prefix string, acked map[string]int64) *load {
	l := &load{c: c, stop: make(chan struct{}), acked: acked}
	for w := 0; w < writers; w++ {
		entity := fmt.Sprintf("%s-%d", prefix, w)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				l.mu.Lock()
				i := l.acked[entity]
				l.mu.Unlock()
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				_, err := c.Append(ctx, entity, []kuma.EventInput{{Type: "Tick", Data: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i))}},
					client.IdempotencyKey(fmt.Sprintf("%s/%d", entity, i)))
				cancel()
				if err != nil {
					l.fail.Add(1)
					l.mu.Lock()
					l.errs = append(l.errs, fmt.Sprintf("%s #%d: %v", entity, i, err))
					l.mu.Unlock()
					continue // the same key again: safe
				}
				l.ok.Add(1)
				l.mu.Lock()
				l.acked[entity] = i + 1
				l.mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *load) end() { close(l.stop); l.wg.Wait() }
