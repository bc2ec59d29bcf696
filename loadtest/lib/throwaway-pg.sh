# Sourced: starts a throwaway PostgreSQL 15 on a free loopback port, sets
# $pg_bin, $pg_port, $pg_dir, $pg_url and the array as_pg (run as the postgres
# user when root), and stops and removes it on exit. Installs Debian's
# postgresql-15 when missing. PG_OPTS: more server options ("-c fsync=off");
# PG_SCHED: chrt arguments for the server ("--idle 0": it only gets CPU the
# rest of the machine leaves); PG_CPUS: taskset CPU list for the server;
# PG_TMPDIR: where its data directory goes (/dev/shm: no disk at all).
pg_bin=/usr/lib/postgresql/15/bin
if [ ! -x $pg_bin/initdb ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
fi
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi
pg_dir=$(mktemp -d ${PG_TMPDIR:+-p "$PG_TMPDIR"})
chmod 755 "$pg_dir"
[ ${#as_pg[@]} -eq 0 ] || chown postgres "$pg_dir"
pg_stop() { "${as_pg[@]}" $pg_bin/pg_ctl -D "$pg_dir/db" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; }
trap pg_stop EXIT
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${as_pg[@]}" $pg_bin/initdb -D "$pg_dir/db" -U postgres --auth=trust >/dev/null
${PG_SCHED:+chrt $PG_SCHED} ${PG_CPUS:+taskset -c $PG_CPUS} "${as_pg[@]}" $pg_bin/pg_ctl -D "$pg_dir/db" -l "$pg_dir/pg.log" -w \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=100 ${PG_OPTS:-}" start >/dev/null
pg_url="host=127.0.0.1 port=$pg_port user=postgres dbname=postgres"
