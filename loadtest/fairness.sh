#!/usr/bin/env bash
# Fairness (design 6): Reserve at 1,000/s while fills arrive faster than the
# service ingests them, so a backlog builds and drains at full speed beside it.
# For each binary given (for a before/after, alternated), each on a fresh
# tansu broker (a broker kept from the run before would hand the next service
# that run's fills as a backlog): Reserve alone at 1,000/s, then the same with
# fills offered at FILL_RATE from a second loadtest. One JSON line per
# measurement.
#   loadtest/fairness.sh BINARY [BINARY...]
# Env: FILL_RATE (default 40000), SECS (default 15), ROUNDS (default 1).
set -uo pipefail
cd "$(dirname "$0")/.."
command -v tansu >/dev/null || { echo "missing: tansu (cargo install tansu --locked --features libsql,dynostore)" >&2; exit 1; }
cargo build --release -q -p loadtest
lt=$PWD/target/release/loadtest
fill_rate=${FILL_RATE:-40000} secs=${SECS:-15} rounds=${ROUNDS:-1}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
run() { # label binary
    local label=$1 svc=$2 g m dir pid fills broker brokers
    g=$(port) m=$(port) dir=$(mktemp -d -p "$work") brokers=127.0.0.1:$(port)
    (cd "$dir" && exec tansu broker --listener-url "tcp://$brokers" --advertised-listener-url "tcp://$brokers" \
        --storage-engine sqlite://tansu.db >tansu.log 2>&1) & broker=$!; pids+=($broker)
    for _ in $(seq 60); do "$svc" kafka-topics --kafka-brokers "$brokers" >/dev/null 2>&1 && break; sleep 0.5; done
    "$svc" serve --data-dir "$dir" --grpc-addr 127.0.0.1:"$g" --metrics-addr 127.0.0.1:"$m" \
        --kafka-brokers "$brokers" 2>/dev/null & pid=$!
    for _ in $(seq 600); do curl -s 127.0.0.1:"$m"/metrics 2>/dev/null | grep -qx 'account_ready 1' && break; sleep 0.1; done
    echo "$label reserve-alone $($lt reserve --addr http://127.0.0.1:"$g" --rate 1000 --duration "$secs" --accounts 1000 2>/dev/null | tail -1)"
    $lt fills --addr http://127.0.0.1:"$g" --brokers "$brokers" --rate "$fill_rate" --duration "$((secs + 10))" \
        --accounts 1000 >"$dir/fills.json" 2>/dev/null & fills=$!
    sleep 5
    echo "$label reserve-during-fills $($lt reserve --addr http://127.0.0.1:"$g" --rate 1000 --duration "$secs" --accounts 1000 2>/dev/null | tail -1)"
    echo "$label consumer-lag-records $(curl -s 127.0.0.1:"$m"/metrics | grep '^account_kafka_consumer_lag_records' | head -3 | tr '\n' ' ')"
    wait "$fills"
    echo "$label fills $(tail -1 "$dir/fills.json")"
    kill "$pid"; wait "$pid" 2>/dev/null
    kill "$broker"; wait "$broker" 2>/dev/null
}
for _ in $(seq "$rounds"); do
    for bin in "$@"; do run "$bin" "$bin"; done
done
