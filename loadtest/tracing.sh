#!/usr/bin/env bash
# Tracing's cost on the Reserve hot path: the same service with traces off
# and with --otlp-endpoint to a local OTLP receiver (examples/otlp_sink.rs:
# every span of every Reserve exported, sample ratio 1) and with 1 % of the
# traces recorded (--otlp-sample-ratio 0.01), alternated so drift hits all
# alike. Each order is a Reserve and an Unreserve: two traced RPCs, ten spans.
# One JSON line per measurement in loadtest/results/trace-{off,on,sampled}-<rate>-<n>.json.
#   loadtest/tracing.sh [SECONDS]     Env: RATES (default "1000 5000"), ROUNDS (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
out=loadtest/results
mkdir -p "$out"
cargo build --release -q -p loadtest -p account-service --example otlp_sink
lt=target/release/loadtest
svc=target/release/account-service
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; return 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
sink=$(port)
target/release/examples/otlp_sink 127.0.0.1:$sink 2>"$work/sink.log" & pids+=($!)
wait_port $sink || { cat "$work/sink.log" >&2; exit 1; }
reserve() { # name rate then serve flags
    local name=$1 rate=$2; shift 2
    local g=$(port) m=$(port) dir=$(mktemp -d -p "$work")
    $svc serve --data-dir "$dir" --grpc-addr 127.0.0.1:$g --metrics-addr 127.0.0.1:$m "$@" 2>"$dir/serve.log" & pids+=($!)
    wait_port $g || { cat "$dir/serve.log" >&2; exit 1; }; sleep 0.5
    $lt reserve --rate "$rate" --duration "$secs" --addr http://127.0.0.1:$g --accounts 1000 \
        --json-out $out/$name.json 2>/dev/null
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
}
for rate in ${RATES:-1000 5000}; do
    for n in $(seq ${ROUNDS:-2}); do
        reserve trace-off-$rate-$n $rate
        reserve trace-on-$rate-$n $rate --otlp-endpoint http://127.0.0.1:$sink
        reserve trace-sampled-$rate-$n $rate --otlp-endpoint http://127.0.0.1:$sink --otlp-sample-ratio 0.01
    done
done
tail -1 "$work/sink.log" || true
for f in $out/trace-*.json; do echo "$(basename "$f" .json): $(cat "$f")"; done
