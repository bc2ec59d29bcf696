#!/usr/bin/env bash
# Before/after of two account-service binaries, alternated in the same minutes
# (the machine's load moves figures by tens of percent between runs):
#   loadtest/ab.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]
# Per round and binary: unary Reserve stepped to its maximum (p99 < 20 ms), then
# batches of 100 at 1,000 batches/s and unary Reserve at 1,000/s, 10 s each.
# Each service starts on a fresh data directory with --capacity-orders 1000000.
# One line per measurement: "<before|after> <name> <loadtest JSON>".
set -uo pipefail
cd "$(dirname "$0")/.."
before=${1:?before binary} after=${2:?after binary} rounds=${3:-2}
cargo build --release -q -p loadtest
lt=target/release/loadtest
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { # label binary then loadtest args
    local label=$1 svc=$2; shift 2
    local g m dir pid
    g=$(port) m=$(port) dir=$(mktemp -d)
    "$svc" serve --data-dir "$dir" --grpc-addr 127.0.0.1:"$g" --metrics-addr 127.0.0.1:"$m" \
        --capacity-orders 1000000 2>/dev/null & pid=$!
    for _ in $(seq 600); do curl -s 127.0.0.1:"$m"/metrics 2>/dev/null | grep -qx 'account_ready 1' && break; sleep 0.1; done
    echo "$label $($lt "$@" --addr http://127.0.0.1:"$g" --accounts 1000 2>/dev/null | tail -1)"
    kill "$pid"; wait "$pid" 2>/dev/null; rm -rf "$dir"
}
for _ in $(seq "$rounds"); do
    for v in before after; do
        bin=$before; [ "$v" = after ] && bin=$after
        run "$v unary-max" "$bin" max --start-rate 4000 --step 1.25 --step-duration 5 --p99-limit-ms 20
    done
    for v in before after; do
        bin=$before; [ "$v" = after ] && bin=$after
        run "$v batch-100x1k" "$bin" batch --rate 1000 --batch-size 100 --duration 10 --unreserve-share 0
        run "$v reserve-1k" "$bin" reserve --rate 1000 --duration 10
    done
done
