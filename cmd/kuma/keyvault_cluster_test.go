//go:build cluster

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/vaultclient"
)

// TestKillFirstNodeKeyvaultsGoOn: three `kuma up` nodes, each running a
// keyvault instance on the shared bucket (one master key, no --keyvault
// remote). kill -9 of the first node, the one that was the cluster's only
// keyvault before the bucket: appends to new entities, reads and forgets
// succeed through the other two within the failover time, and a forgotten
// entity stays forgotten through both.
func TestKillFirstNodeKeyvaultsGoOn(t *testing.T) {
	c, nc := startKeyed(t, "n1") // nothing goes through the victim's server
	cl, err := client.New(nc, client.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	appendNew := func(ctx context.Context, e string) error {
		_, err := cl.Append(ctx, e, []kuma.EventInput{{Type: "Created", Data: json.RawMessage(`{"n":1}`)}}, client.IdempotencyKey(e))
		return err
	}
	for i := range 20 {
		if err := appendNew(t.Context(), fmt.Sprintf("before-%d", i)); err != nil {
			t.Fatalf("append before the kill: %v", err)
		}
	}
	// The victim leads the key bucket, so its death costs the keyvaults an
	// election, not only a node.
	leader := func() string {
		msg, err := nc.Request("$JS.API.STREAM.INFO.KV_KUMA_KEYS", nil, time.Second)
		if err != nil {
			return ""
		}
		var info struct {
			Cluster struct {
				Leader string `json:"leader"`
			} `json:"cluster"`
		}
		_ = json.Unmarshal(msg.Data, &info)
		return info.Cluster.Leader
	}
	for deadline := time.Now().Add(30 * time.Second); leader() != "n1"; {
		if time.Now().After(deadline) {
			t.Fatalf("the key bucket's leader is %q, and would not move to n1", leader())
		}
		_, _ = nc.Request("$JS.API.STREAM.LEADER.STEPDOWN.KV_KUMA_KEYS", []byte(`{"placement":{"preferred":"n1"}}`), 5*time.Second)
		time.Sleep(500 * time.Millisecond)
	}
	victim := c.node("n1")
	if err := victim.p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = victim.p.cmd.Wait()
	killed := time.Now()

	// The keyvaults alone first: a new key over NATS, from whichever
	// instance answers.
	vc := vaultclient.New(nc, 0)
	var vaultBack time.Duration
	var vaultErrs []string
	for i := 0; ; i++ {
		if time.Since(killed) > 2*time.Minute {
			t.Fatalf("no keyvault created a key within 2 minutes of the kill: %v", vaultErrs)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := vc.DataKey(ctx, "default", fmt.Sprintf("vault-probe-%d", i), true)
		cancel()
		if err == nil {
			vaultBack = time.Since(killed)
			break
		}
		if len(vaultErrs) < 20 {
			// With the bucket's leader: the election is most of the wait.
			vaultErrs = append(vaultErrs, fmt.Sprintf("%v: %v (bucket leader %q)", time.Since(killed).Round(time.Millisecond), err, leader()))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("a keyvault created a new key %v after the kill (errors before: %v)", vaultBack.Round(time.Millisecond), vaultErrs)

	// 200 new entities, one after the other, each retried until accepted:
	// the failures are those of n1's shards until they move (unavailable,
	// timeout), never of a keyvault.
	var firstOK time.Duration
	failed := map[kuma.Code]int{}
	var samples []string
	for i := range 200 {
		e := fmt.Sprintf("after-%d", i)
		for {
			if time.Since(killed) > 2*time.Minute {
				t.Fatalf("new entity %s not accepted within 2 minutes of the kill; failures so far %v", e, failed)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := appendNew(ctx, e)
			cancel()
			if err == nil {
				break
			}
			failed[kuma.ErrorCode(err)]++
			if len(samples) < 10 {
				samples = append(samples, fmt.Sprintf("%v %s: %v", time.Since(killed).Round(time.Millisecond), e, err))
			}
			if !errors.Is(err, kuma.ErrUnavailable) && !errors.Is(err, kuma.ErrTimeout) {
				t.Fatalf("append to new entity %s %v after the kill: %v", e, time.Since(killed), err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if i == 0 {
			firstOK = time.Since(killed)
		}
	}
	all := time.Since(killed)
	t.Logf("the key bucket's leader after the kill: %s", leader())
	for _, e := range []string{"before-7", "after-13"} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := cl.Forget(ctx, e, "test", "dpo")
		cancel()
		if err != nil {
			t.Fatalf("forget %s after the kill: %v", e, err)
		}
	}
	for _, url := range []string{c.urls("n1", "n3"), c.urls("n1", "n2")} {
		other, err := client.New(connect(t, url), client.Options{Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range []string{"before-7", "after-13"} {
			if _, err := other.Read(t.Context(), e); !errors.Is(err, kuma.ErrEntityForgotten) {
				t.Errorf("read of forgotten %s through %s: got %v, want entity_forgotten", e, url, err)
			}
		}
		if _, err := other.Read(t.Context(), "after-199"); err != nil {
			t.Errorf("read of after-199 through %s: %v", url, err)
		}
	}
	t.Logf("kill -9 of n1: first new entity accepted %v after the kill, 200 new entities %v after it; failed attempts (retried) %v; 2 forgets went through",
		firstOK.Round(time.Millisecond), all.Round(time.Millisecond), failed)
	for _, s := range samples {
		t.Logf("failed attempt: %s", s)
	}
}
