#!/usr/bin/env bash
# Cluster throughput on one machine: kuma bench (EV events, default
# 300,000) against one `kuma up`, then against three joined `kuma up` nodes
# with --durability local and replicated. See docs/cluster.md for results.
# Usage: loadtest/cluster-bench.sh   (ports 14222, 24221-24223, 26221-26223,
# 19464, 29461-29463 on 127.0.0.1 must be free)
set -u
cd "$(dirname "$0")/.."
D=$(mktemp -d); K=$D/kuma; EV=${EV:-300000}
CGO_ENABLED=0 go build -o "$K" ./cmd/kuma
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; sleep 1; kill -9 "${pids[@]}" 2>/dev/null; rm -rf $D; }
trap cleanup EXIT
waitready() { for i in $(seq 1 300); do grep -q "kuma ready" "$1" && return 0; sleep 0.2; done; echo "not ready: $1"; tail -5 "$1"; return 1; }
summary() { grep -E "events/s|append|errors|verif" | head -8; }
echo "== one node"
$K up --node a1 --data $D/a1 --nats-listen 127.0.0.1:14222 --metrics-listen 127.0.0.1:19464 --console-listen "" --log-format text 2>$D/a1.log & pids+=($!)
waitready $D/a1.log
$K bench --nats-url nats://127.0.0.1:14222 --events $EV --progress off 2>&1 | summary
kill -9 "${pids[@]}"; pids=()
for dur in local replicated; do
echo "== three nodes, durability $dur"
rm -rf $D/n*
$K up --node n1 --data $D/n1 --nats-listen 127.0.0.1:24221 --cluster-listen 127.0.0.1:26221 --metrics-listen 127.0.0.1:29461 --console-listen "" --durability $dur --log-format text 2>$D/n1.log & pids+=($!)
$K up --node n2 --data $D/n2 --nats-listen 127.0.0.1:24222 --cluster-listen 127.0.0.1:26222 --metrics-listen 127.0.0.1:29462 --console-listen "" --durability $dur --join nats://127.0.0.1:26221 --keyvault remote --log-format text 2>$D/n2.log & pids+=($!)
waitready $D/n1.log; waitready $D/n2.log
$K up --node n3 --data $D/n3 --nats-listen 127.0.0.1:24223 --cluster-listen 127.0.0.1:26223 --metrics-listen 127.0.0.1:29463 --console-listen "" --durability $dur --join nats://127.0.0.1:26221,nats://127.0.0.1:26222 --keyvault remote --log-format text 2>$D/n3.log & pids+=($!)
waitready $D/n3.log
sleep 12
echo "streams raised: $(grep -h 'raised the replicas' $D/n*.log | wc -l)"
$K bench --nats-url nats://127.0.0.1:24221,nats://127.0.0.1:24222,nats://127.0.0.1:24223 --events $EV --progress off 2>&1 | summary
kill -9 "${pids[@]}"; pids=()
sleep 1
done
