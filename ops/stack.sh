#!/usr/bin/env bash
# The whole system on this machine, with one command: a tansu Kafka-protocol
# broker and a throwaway PostgreSQL 15 on free loopback ports, the service's
# topics, and the service with both on. Prints where everything listens and a
# grpcurl line to try; ctrl-c (or SIGTERM) stops everything and removes the
# temporary directory (WAL, broker storage, database).
#
#   ops/stack.sh [--grpc-port 50051] [--metrics-port 9464] [--loadtest SECONDS]
#
# --loadtest N: once up, N seconds of `loadtest reserve` at 500/s against it.
# ACCOUNT_SERVICE_BIN / LOADTEST_BIN: binaries to use (default: built here
# with `cargo build --release`). Nothing is installed: what is missing is named,
# with how to get it.
set -euo pipefail
cd "$(dirname "$0")/.."

grpc_port=50051 metrics_port=9464 loadtest_secs=0
while (($#)); do
    case $1 in
        --grpc-port) grpc_port=$2; shift 2 ;;
        --metrics-port) metrics_port=$2; shift 2 ;;
        --loadtest) loadtest_secs=$2; shift 2 ;;
        *) sed -n '2,14p' "$0" >&2; exit 2 ;;
    esac
done

missing=0
if ! command -v tansu >/dev/null; then
    echo "missing: tansu (the Kafka-protocol broker): cargo install tansu --locked --features libsql,dynostore  (about 12 minutes)" >&2
    missing=1
fi
if [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    echo "missing: PostgreSQL 15: apt-get install postgresql-15" >&2
    missing=1
fi
command -v python3 >/dev/null || { echo "missing: python3: apt-get install python3" >&2; missing=1; }
((missing == 0)) || exit 1

if [ -z "${ACCOUNT_SERVICE_BIN:-}" ] || { ((loadtest_secs > 0)) && [ -z "${LOADTEST_BIN:-}" ]; }; then
    echo "building (cargo build --release)..." >&2
    cargo build --release -q -p account-service -p loadtest
fi
service=${ACCOUNT_SERVICE_BIN:-target/release/account-service}
loadtest=${LOADTEST_BIN:-target/release/loadtest}

# PostgreSQL: $pg_url, $pg_port, pg_stop (its own EXIT trap is replaced below).
. loadtest/lib/throwaway-pg.sh
stack_dir=$(mktemp -d)
service_pid= broker_pid=
stop_all() {
    trap - EXIT INT TERM
    [ -n "$service_pid" ] && kill -TERM "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null
    [ -n "$broker_pid" ] && kill -TERM "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
    pg_stop
    rm -rf "$stack_dir"
    echo "stack stopped"
}
trap stop_all EXIT
trap 'exit 0' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kafka_port=$(free_port)
brokers=127.0.0.1:$kafka_port
(cd "$stack_dir" && exec tansu broker --listener-url "tcp://$brokers" --advertised-listener-url "tcp://$brokers" \
    --storage-engine sqlite://tansu.db >tansu.log 2>&1) &
broker_pid=$!
topics=0
for _ in $(seq 60); do
    if "$service" kafka-topics --kafka-brokers "$brokers" --partitions 3 >"$stack_dir/topics.log" 2>"$stack_dir/topics.err"; then
        topics=$(grep -c . "$stack_dir/topics.log")
        break
    fi
    kill -0 "$broker_pid" 2>/dev/null || { echo "tansu exited:" >&2; cat "$stack_dir/tansu.log" >&2; exit 1; }
    sleep 0.5
done
((topics > 0)) || { echo "could not create the topics:" >&2; cat "$stack_dir/topics.err" >&2; exit 1; }

"$service" serve --data-dir "$stack_dir/data" \
    --grpc-addr "127.0.0.1:$grpc_port" --metrics-addr "127.0.0.1:$metrics_port" \
    --kafka-brokers "$brokers" --postgres-url "$pg_url" 2>"$stack_dir/service.log" &
service_pid=$!
for _ in $(seq 120); do
    if python3 -c "import urllib.request,sys; b=urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics',timeout=1).read().decode(); sys.exit(0 if '\naccount_ready 1\n' in b else 1)" 2>/dev/null; then
        break
    fi
    kill -0 "$service_pid" 2>/dev/null || { echo "the service exited:" >&2; cat "$stack_dir/service.log" >&2; exit 1; }
    sleep 0.5
done

cat <<INFO
stack ready
  account-service  gRPC 127.0.0.1:$grpc_port   metrics http://127.0.0.1:$metrics_port/metrics   (pid $service_pid)
  Kafka (tansu)    $brokers   $topics topics (pid $broker_pid)
  PostgreSQL 15    $pg_url   (pid $(head -1 "$pg_dir/db/postmaster.pid"))
  logs and data    $stack_dir
try:
  grpcurl -plaintext -d '{"request_id":"open-42","account_id":42,"base_currency":"USD"}' 127.0.0.1:$grpc_port account.v1.AdminService/OpenAccount
  psql "$pg_url" -c 'SELECT * FROM snapshot_meta'
ctrl-c stops everything.
INFO

if ((loadtest_secs > 0)); then
    "$loadtest" reserve --addr "http://127.0.0.1:$grpc_port" --rate 500 --duration "$loadtest_secs"
fi
wait "$service_pid"
