#!/usr/bin/env bash
# Replicas (design 7) against a single node, in one run: the disk's fdatasync,
# then Reserve at 1,000/s and at its maximum on one node and on a group of
# three replicas (same binary, same machine, loopback), then failover: the
# leader killed (SIGKILL) CYCLES times, each time the time until a deposit sent
# to a survivor is acknowledged (the client follows the `leader` trailer), and
# the catch-up of the killed replica once restarted.
# Last, catch-up under load: a follower down for 10 s while Reserve runs at
# 1,000/s, then restarted: how fast it applies what it missed.
# One JSON line per load measurement in loadtest/results/<name>.json; failover
# and catch-up figures on stdout. PHASES (default "single replicas failover
# catchup") runs some of them.
#   loadtest/replicas.sh [SECONDS] [CYCLES]      (SVC=path: another service binary, for A/B)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cycles=${2:-10}
phases=" ${PHASES:-single replicas failover catchup} "
has() { [[ "$phases" == *" $1 "* ]]; }
out=loadtest/results
mkdir -p "$out"
cargo build --release -q -p loadtest -p account-service
lt=target/release/loadtest
svc=${SVC:-target/release/account-service}
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "${data:-}"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 600); do curl -s 127.0.0.1:$1/metrics | grep -qx 'account_ready 1' && return; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
now_ms() { date +%s%3N; }

data=$(mktemp -d)
$lt sync-probe --dir "$data" --count 2000 --json-out $out/sync-probe.json

# One node.
if has single; then
g=$(port) m=$(port)
$svc serve --data-dir "$data/single" --grpc-addr 127.0.0.1:$g --metrics-addr 127.0.0.1:$m --capacity-orders 300000 2>/dev/null & pids+=($!)
wait_ready $m
$lt reserve --addr http://127.0.0.1:$g --rate 1000 --duration "$secs" --accounts 1000 --json-out $out/single-1k.json 2>/dev/null
$lt max --addr http://127.0.0.1:$g --start-rate 1000 --step 1.25 --step-duration 5 --p99-limit-ms 20 \
    --accounts 1000 --json-out $out/single-max.json 2>/dev/null
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
fi

# Three replicas.
declare -a grpc raft metrics rpid
for i in 1 2 3; do grpc[$i]=$(port); raft[$i]=$(port); metrics[$i]=$(port); done
peers="1=127.0.0.1:${raft[1]},2=127.0.0.1:${raft[2]},3=127.0.0.1:${raft[3]}"
start_replica() {
    $svc serve --data-dir "$data/r$1" --grpc-addr 127.0.0.1:${grpc[$1]} --metrics-addr 127.0.0.1:${metrics[$1]} \
        --node-id "$1" --raft-addr 127.0.0.1:${raft[$1]} --peers "$peers" --capacity-orders 300000 2>>"$data/r$1.log" &
    rpid[$1]=$!; pids+=($!)
}
for i in 1 2 3; do start_replica $i; done
for i in 1 2 3; do wait_ready ${metrics[$i]}; done
# The replica that leads, by ClusterStatus (any replica answers).
leader() {
    for _ in $(seq 400); do
        for i in 1 2 3; do
            [ -n "${rpid[$i]:-}" ] || continue
            local s; s=$($svc cluster --addr http://127.0.0.1:${grpc[$i]} 2>/dev/null) || continue
            if grep -qx 'role: LEADER' <<<"$s"; then echo "$i"; return; fi
        done
        sleep 0.05
    done
    echo "no leader" >&2; exit 1
}
# One line of this replica's ClusterStatus (empty when it does not answer).
field() { $svc cluster --addr http://127.0.0.1:${grpc[$1]} 2>/dev/null | sed -n "s/^$2: //p"; }
l=$(leader)
if has replicas; then
# loadtest follows the leader itself; given the leader's address it goes straight there.
$lt reserve --addr http://127.0.0.1:${grpc[$l]} --rate 1000 --duration "$secs" --accounts 1000 --json-out $out/replicas-1k.json 2>/dev/null
$lt max --addr http://127.0.0.1:${grpc[$l]} --start-rate 1000 --step 1.25 --step-duration 5 --p99-limit-ms 20 \
    --accounts 1000 --json-out $out/replicas-max.json 2>/dev/null

fi

# Failover: kill -9 the leader, time until a survivor acknowledges a deposit.
if has failover; then
failovers=()
catchups=()
for c in $(seq "$cycles"); do
    l=$(leader)
    survivor=$(( l % 3 + 1 ))
    kill -9 "${rpid[$l]}"; wait "${rpid[$l]}" 2>/dev/null || true; rpid[$l]=
    t0=$(now_ms)
    until $svc deposit --addr http://127.0.0.1:${grpc[$survivor]} --account-id 1000000 --amount 1 --currency USD \
        --event-id "failover-$c-$$" >/dev/null 2>&1; do sleep 0.01; done
    failovers+=($(( $(now_ms) - t0 )))
    # The new leader's last log index: the killed replica catches up to it.
    nl=$(leader)
    target=$($svc cluster --addr http://127.0.0.1:${grpc[$nl]} | sed -n 's/^last_log_index: //p')
    t1=$(now_ms)
    start_replica "$l"
    until applied=$($svc cluster --addr http://127.0.0.1:${grpc[$l]} 2>/dev/null | sed -n 's/^applied_log_index: //p') \
        && [ -n "$applied" ] && [ "$applied" -ge "$target" ]; do sleep 0.02; done
    catchups+=($(( $(now_ms) - t1 )))
    echo "cycle $c: node $l killed, writes again after ${failovers[-1]} ms; restarted, caught up to log index $target after ${catchups[-1]} ms"
done
stats() { sort -n | awk '{a[NR]=$1} END {printf "median %d ms, max %d ms over %d cycles\n", a[int((NR+1)/2)], a[NR], NR}'; }
echo "failover (kill -9 of the leader to the first acknowledged write): $(printf '%s\n' "${failovers[@]}" | stats)"
echo "restart and catch-up of the killed replica: $(printf '%s\n' "${catchups[@]}" | stats)"
fi

# Catch-up under load.
if has catchup; then
    l=$(leader); f=$(( l % 3 + 1 ))
    $lt reserve --addr http://127.0.0.1:${grpc[$l]} --rate 1000 --duration 30 --accounts 1000 \
        --json-out $out/replicas-catchup-load.json 2>/dev/null & load=$!
    sleep 3
    kill -9 "${rpid[$f]}"; wait "${rpid[$f]}" 2>/dev/null || true; rpid[$f]=
    sleep 10
    target=$(field "$l" applied_sequence)
    t0=$(now_ms)
    start_replica "$f"
    until s0=$(field "$f" applied_sequence) && [ -n "$s0" ]; do sleep 0.02; done
    t1=$(now_ms)
    until s=$(field "$f" applied_sequence) && [ -n "$s" ] && [ "$s" -ge "$target" ]; do sleep 0.02; done
    t2=$(now_ms)
    spent=$(( t2 - t1 > 0 ? t2 - t1 : 1 ))
    echo "catch-up under load: node $f answered $(( t1 - t0 )) ms after its restart at sequence $s0, \
$(( target - s0 )) commands behind the leader's sequence at the restart ($target); reached it $spent ms later: \
$(( (target - s0) * 1000 / spent )) commands/s, while the leader took 1,000 Reserves/s (and their Unreserves)"
    wait $load
    echo "replicas-catchup-load: $(cat $out/replicas-catchup-load.json)"
fi
if [ -z "${PHASES:-}" ]; then
    for f in sync-probe single-1k single-max replicas-1k replicas-max; do echo "$f: $(cat $out/$f.json)"; done
fi
