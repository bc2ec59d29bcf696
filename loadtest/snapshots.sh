#!/usr/bin/env bash
# PostgreSQL snapshots, measured against a throwaway PostgreSQL 15 (started
# here, removed on exit). Writes one JSON line per measurement to
# loadtest/results/<name>.json:
#   replay-snapshot[-short-window]
#                       the same journal of RECORDS records restarted by full
#                       replay and from a snapshot (+ WAL tail), with the
#                       service's 24 h idempotency window and with 100 ms
#   reserve-snap-{off,on}-<rate>-<n>
#                       the gRPC Reserve hot path with snapshots off and on
#                       (every second), alternated so drift hits both alike
#   reserve-snap-nohist-<rate>-<n>
#                       snapshots on with --history false: what writing
#                       account_events costs per snapshot (snapshot_write_mean_us)
#   loadtest/snapshots.sh [SECONDS] [RECORDS]   (RECORDS=0: skip the restart;
#   RATES="1000 5000" by default; TAG: a suffix for the result names)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
records=${2:-1000000}
out=loadtest/results
mkdir -p "$out"
cargo build --release -q -p loadtest -p account-service
lt=target/release/loadtest
svc=target/release/account-service
. loadtest/lib/throwaway-pg.sh
psql=(psql -h 127.0.0.1 -p "$pg_port" -U postgres -q -v ON_ERROR_STOP=1)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "${data:-}"; pg_stop; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }

if [ "$records" != 0 ]; then
    # Every record adds an idempotency key and most a reservation: with the
    # 24 h window the state is as large as the history.
    $lt replay --records "$records" --postgres-url "$pg_url" --json-out $out/replay-snapshot.json 2>/dev/null
    "${psql[@]}" -c 'DROP SCHEMA public CASCADE; CREATE SCHEMA public' postgres
    # A window short against the journal's span (the journal is written in
    # about a second): the state is a small part of the history.
    $lt replay --records "$records" --postgres-url "$pg_url" --idempotency-window-ms 100 \
        --json-out $out/replay-snapshot-short-window.json 2>/dev/null
fi

data=$(mktemp -d)
reserve() { # name rate then serve flags
    local name=$1 rate=$2; shift 2
    local g=$(port) m=$(port) dir=$(mktemp -d -p "$data")
    "${psql[@]}" -c 'DROP SCHEMA public CASCADE; CREATE SCHEMA public' postgres
    $svc serve --data-dir "$dir" --grpc-addr 127.0.0.1:$g --metrics-addr 127.0.0.1:$m "$@" 2>/dev/null & pids+=($!)
    wait_port $g; sleep 0.5
    $lt reserve --rate "$rate" --duration "$secs" --addr http://127.0.0.1:$g --accounts 1000 \
        --json-out $out/$name.json 2>/dev/null
    # The service's own view: snapshot writes and the engine thread's copy time.
    curl -s http://127.0.0.1:$m/metrics | python3 -c '
import json, sys
m = {l.split()[0]: float(l.split()[1]) for l in sys.stdin if l.startswith("account_snapshot")}
mean = lambda n: round(m[n + "_sum"] / m[n + "_count"] * 1e6) if m.get(n + "_count") else None
f = sys.argv[1]; s = json.load(open(f))
s["snapshots"] = int(m.get("account_snapshot_seconds_count", 0))
s["snapshot_write_mean_us"] = mean("account_snapshot_seconds")
s["snapshot_copy_mean_us"] = mean("account_snapshot_copy_seconds")
s["history_events"] = int(m.get("account_snapshot_history_events_total", 0))
json.dump(s, open(f, "w"), sort_keys=True)' $out/$name.json
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
}
for rate in ${RATES:-1000 5000}; do
    for n in 1 2; do
        reserve reserve-snap-off-$rate-$n${TAG:+-$TAG} $rate
        reserve reserve-snap-nohist-$rate-$n${TAG:+-$TAG} $rate --postgres-url "$pg_url" --snapshot-interval-ms 1000 --history false
        reserve reserve-snap-on-$rate-$n${TAG:+-$TAG} $rate --postgres-url "$pg_url" --snapshot-interval-ms 1000
    done
done
for f in $out/replay-snapshot*.json $out/reserve-snap-*.json; do [ -f "$f" ] || continue; echo "$(basename "$f" .json): $(cat "$f")"; done
