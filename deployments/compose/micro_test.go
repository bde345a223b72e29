//go:build docker

package compose

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
)

// TestComposeMicroservices runs docker-compose.micro.yml: three NATS servers
// of our image (kuma serve --target nats) in one cluster, one keyvault,
// three shardnodes, a projector and two routers, each its own container.
// From the host it appends, reads and queries the projector's read model,
// then scales the shardnodes from three to four.
func TestComposeMicroservices(tt *testing.T) {
	p, port, t := newProject(tt, "docker-compose.micro.yml")
	start := time.Now()
	p.must(3*time.Minute, "up", "-d")
	c, status := connect(t, port)
	st, _ := waitSettled(t, status, "three shardnodes sharing the shards", 3)
	t.Logf("microservices up (%s), shards settled on 3 shardnodes %s after docker-compose up",
		strings.ReplaceAll(p.must(time.Minute, "ps", "--services"), "\n", " "), time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var last *kuma.AppendReply
	for i := 0; i < 20; i++ {
		ar, err := c.Append(ctx, fmt.Sprintf("micro-%d", i), []kuma.EventInput{{Type: "Created", Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))}})
		if err != nil {
			t.Fatalf("append from the host: %v", err)
		}
		last = ar
	}
	for i := 0; i < 20; i++ {
		r, err := c.Read(ctx, fmt.Sprintf("micro-%d", i))
		if err != nil || r.Version != 1 || string(r.State) != fmt.Sprintf(`{"n":%d}`, i) {
			t.Fatalf("read micro-%d = %+v, %v", i, r, err)
		}
	}
	// The projector (its own container) opens the sealed events through the
	// keyvault (another container) to keep its read model.
	// After waits for the last append's shard; the other shards' events
	// may land a moment later.
	projected := waitFor(t, "the projector's entities read model", time.Minute, func() string {
		q, err := c.Query(ctx, "entities", &kuma.QueryRequest{After: last.Position})
		if err != nil {
			return err.Error()
		}
		if len(q.Rows) != 20 {
			return fmt.Sprintf("%d rows, want 20", len(q.Rows))
		}
		return ""
	})
	t.Logf("the projector's read model held all 20 entities %s after the last append", projected.Round(time.Millisecond))

	start = time.Now()
	p.must(3*time.Minute, "up", "-d", "--no-recreate", "--scale", "shardnode=4")
	st, _ = waitSettled(t, status, "four shardnodes sharing the shards", 4)
	t.Logf("shardnode 3→4: settled %s after docker-compose up --scale began; shards per node %v", time.Since(start).Round(time.Millisecond), nodeShards(st))
	// Rendezvous hashing may leave one of four randomly named nodes with
	// no shard (about 1% a node for 16 shards): each holds what hashing
	// gives it, and the newcomer took some unless hashing gave it none.
	if got, want := nodeShards(st), placed(st); !maps.Equal(got, want) {
		t.Errorf("shards per node %v after the scale, rendezvous hashing over the members gives %v", got, want)
	}
	for i := 0; i < 20; i++ {
		if r, err := c.Read(ctx, fmt.Sprintf("micro-%d", i)); err != nil || r.Version != 1 {
			t.Fatalf("read micro-%d after the scale = %+v, %v", i, r, err)
		}
	}

	p.cleanStop()
}
