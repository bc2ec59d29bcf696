#!/usr/bin/env bash
# The seed's design as a peer: a pgbench script of its Reserve transaction
# (duplicate check on request history, SELECT ... FOR UPDATE on the account,
# balance update, inserts into reserves, request history and outbox) against a
# throwaway PostgreSQL 15 started here, at a fixed rate (pgbench --rate is open
# loop: latency counts from the scheduled start). Prints the same one-line JSON
# summary as `loadtest`.
#   loadtest/peers/seed-pg/run.sh --rate 1000 --duration 10 [--clients 8] [--accounts 1000]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rate=1000 duration=10 clients=8 accounts=1000
while (($#)); do
    case $1 in
        --rate) rate=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --clients) clients=$2; shift 2 ;;
        --accounts) accounts=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done
. "$here/../../lib/throwaway-pg.sh"
bin=$pg_bin port=$pg_port tmp=$pg_dir
psql=(psql -h 127.0.0.1 -p "$port" -U postgres -q -v ON_ERROR_STOP=1)
"${psql[@]}" -v accounts="$accounts" -f "$here/schema.sql" postgres >/dev/null
cd "$tmp"
"${as_pg[@]}" $bin/pgbench -h 127.0.0.1 -p "$port" -U postgres -n -f "$here/reserve.sql" -D accounts="$accounts" \
    --rate="$rate" -T "$duration" -c "$clients" -j 2 --log --log-prefix="$tmp/log" postgres >"$tmp/pgbench.out" 2>&1 \
    || { cat "$tmp/pgbench.out" >&2; exit 1; }
python3 - "$tmp" "$rate" "$duration" <<'PY'
import glob, json, sys
tmp, rate, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lat, errors = [], 0
for path in glob.glob(f"{tmp}/log*"):
    for line in open(path):
        f = line.split()
        # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
        if f[2] in ("failed", "skipped"):
            errors += 1
            continue
        total = int(f[2]) + (int(f[6]) if len(f) > 6 else 0)
        lat.append(total)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0
print(json.dumps({
    "mode": "seed-pg-reserve", "target_rate": rate, "sent": len(lat) + errors, "ok": len(lat),
    "rejected": 0, "errors": errors, "throughput": round(len(lat) / duration, 1),
    "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": lat[-1] if lat else 0},
}))
PY
