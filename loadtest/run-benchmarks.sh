#!/usr/bin/env bash
# Runs the design-section-6 measurements side by side in one run and
# writes one JSON line per measurement to loadtest/results/<name>.json:
# disk fdatasync latency, the echo-server ceiling, the service (sync and async
# durability) at fixed rates and at its maximum, ReserveBatch and ReserveStream
# at their maximum (and the echo server's), the seed's design as a peer, then
# the engine alone (ordinary and huge pages), a cold restart's WAL replay and
# an idle service's CPU.
#   loadtest/run-benchmarks.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
out=loadtest/results
mkdir -p "$out"
cargo build --release -q -p loadtest -p account-service
lt=target/release/loadtest
svc=target/release/account-service
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "${data:-}"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }

data=$(mktemp -d)
$lt sync-probe --dir "$data" --count 2000 --json-out $out/sync-probe.json

# The ceiling: an empty server of the same proto.
p=$(port); $lt echo-server --listen 127.0.0.1:$p 2>/dev/null & pids+=($!); wait_port $p
$lt max --addr http://127.0.0.1:$p --start-rate 2000 --step 1.25 --step-duration 5 --p99-limit-ms 20 \
    --accounts 1000 --json-out $out/echo-max.json 2>/dev/null
# The same ceiling for the batch and stream RPCs (it answers them at once too).
$lt max --addr http://127.0.0.1:$p --via batch --batch-size 100 --start-rate 100 --step 1.25 --step-duration 5 \
    --p99-limit-ms 10 --max-steps 16 --unreserve-share 0 --accounts 1000 --json-out $out/echo-batch-max.json 2>/dev/null
$lt max --addr http://127.0.0.1:$p --via stream --streams 4 --window 1024 --start-rate 10000 --step 1.25 --step-duration 5 \
    --p99-limit-ms 10 --max-steps 16 --unreserve-share 0 --accounts 1000 --json-out $out/echo-stream-max.json 2>/dev/null
kill "${pids[-1]}"

run_service() { # name durability then loadtest args
    local name=$1 durability=$2; shift 2
    local g=$(port) m=$(port) dir=$(mktemp -d -p "$data")
    # Tables sized for the run's orders (3 M, about 3 GiB): no resize stalls inside it.
    $svc serve --data-dir "$dir" --grpc-addr 127.0.0.1:$g --metrics-addr 127.0.0.1:$m --durability "$durability" \
        --capacity-orders 3000000 2>/dev/null & pids+=($!)
    wait_port $m
    for _ in $(seq 600); do curl -s 127.0.0.1:$m/metrics | grep -qx 'account_ready 1' && break; sleep 0.1; done
    $lt "$@" --addr http://127.0.0.1:$g --accounts 1000 --json-out $out/$name.json 2>/dev/null
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
}
run_service reserve-sync-1k sync reserve --rate 1000 --duration "$secs"
run_service reserve-async-10k async reserve --rate 10000 --duration "$secs"
run_service reserve-sync-max sync max --start-rate 2000 --step 1.25 --step-duration 5 --p99-limit-ms 20
# The high-rate path (design 4.1): Reserves only, as the seed peer does.
run_service batch-100x1k sync batch --rate 1000 --batch-size 100 --duration "$secs" --unreserve-share 0
# As many steps as the echo server's searches: twelve stop at 116,415 items/s, which
# the service reached in both (2026-12-06 third session).
run_service batch-max sync max --via batch --batch-size 100 --start-rate 100 --step 1.25 --step-duration 5 \
    --p99-limit-ms 10 --max-steps 16 --unreserve-share 0
run_service stream-max sync max --via stream --streams 4 --window 1024 --start-rate 10000 --step 1.25 --step-duration 5 \
    --p99-limit-ms 10 --max-steps 16 --unreserve-share 0
# The seed's design (PostgreSQL transaction per Reserve), same rates.
loadtest/peers/seed-pg/run.sh --rate 1000 --duration "$secs" > $out/seed-pg-1k.json
loadtest/peers/seed-pg/run.sh --rate 5000 --duration "$secs" --clients 16 > $out/seed-pg-5k.json
# In process: the state machine alone, then a restart's replay.
$lt engine --commands 3000000 --capacity-orders 1000000 --json-out $out/engine.json
$lt engine --commands 3000000 --capacity-orders 1000000 --huge-pages --json-out $out/engine-huge-pages.json
$lt replay --records 1000000 --json-out $out/replay.json
# Design 6: 10 M records under 5 s.
$lt replay --records 10000000 --json-out $out/replay-10m.json
# An idle service: CPU ticks (utime + stime, 1/100 s) over 30 s, once serving.
g=$(port) m=$(port) dir=$(mktemp -d -p "$data")
$svc serve --data-dir "$dir" --grpc-addr 127.0.0.1:$g --metrics-addr 127.0.0.1:$m 2>/dev/null & pids+=($!)
wait_port $m
for _ in $(seq 600); do curl -s 127.0.0.1:$m/metrics | grep -qx 'account_ready 1' && break; sleep 0.1; done
sleep 2
ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
before=$(ticks "${pids[-1]}"); sleep 30; after=$(ticks "${pids[-1]}")
echo "{\"mode\":\"idle\",\"seconds\":30,\"cpu_ticks\":$((after - before)),\"core_percent\":$(python3 -c "print(round(($after - $before) / 30, 3))")}" > $out/idle.json
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
for f in $out/*.json; do echo "$(basename "$f" .json): $(cat "$f")"; done
