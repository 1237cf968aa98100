#!/usr/bin/env bash
# walfs receive beside pg_receivewal, on one real PostgreSQL, in one run.
#
#   bash mount-tests/bench/receive-bench.sh [WAL_MB] [TPS_SECONDS] [ROUNDS]
#
# 1. Receive throughput: with the receiver stopped, the server writes WAL_MB (default 1024) of
#    WAL into a replication slot (pgbench -i); then the receiver starts and we time until its
#    flush position (pg_stat_replication.flush_lsn) reaches the server's. walfs also uploads to
#    a local archive meanwhile; pg_receivewal only writes files.
# 2. Synchronous commit: pgbench TPS (-c 4, TPS_SECONDS, default 20) of a primary with
#    synchronous_standby_names = 'walfs' served by `walfs receive --synchronous` and by
#    `pg_receivewal --synchronous`, beside the same primary with no synchronous standby; ROUNDS
#    (default 3) rounds, the three alternating within each, reported as medians (a single
#    20 s run on a small machine varies by 10% or more from one run to the next). The
#    receiver's CPU time (user + system, from /proc) per 1000 transactions is reported beside.
#    PROFILE=perf records each receiver with `perf record -g` instead and prints where its
#    CPU time goes.
# 3. With PROFILE=1, one more TPS_SECONDS run of each receiver under `strace -c -f`: system
#    calls per transaction (fsyncs, writes, socket reads and writes), to see where a gap
#    comes from. strace slows both, so these runs are not timed.
# Needs root and what .ci/setup installs; builds walfs in release.
set -euo pipefail

WAL_MB=${1:-1024}
TPS_SECONDS=${2:-20}
ROUNDS=${3:-3}
case "${PROFILE:-0}" in
    0) ;;
    1) command -v strace >/dev/null || { echo "PROFILE=1 needs strace (apt-get install strace)" >&2; exit 2; } ;;
    perf) command -v perf >/dev/null || { echo "PROFILE=perf needs perf (apt-get install linux-perf)" >&2; exit 2; } ;;
    *) echo "PROFILE is 0, 1 (strace) or perf" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/walfs-rbench.XXXXXX)
chmod 0777 "$WORK"
RPID=""
stop_receiver() { if [ -n "$RPID" ]; then kill -TERM "$RPID" 2>/dev/null || true; wait "$RPID" 2>/dev/null || true; RPID=""; fi; }
cleanup() {
    stop_receiver
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
(cd "$ROOT" && cargo build --release --bin walfs -q)
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/walfs" "$WORK/walfs"
WALFS="$WORK/walfs"

runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/data" -A trust --no-sync >/dev/null
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = 5460
max_wal_size = 8GB
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
q() { runuser -u postgres -- psql -h "$WORK" -p 5460 -XAtq -c "$1" postgres; }
CONN="host=$WORK port=5460 user=postgres"
now() { date +%s.%N; }

start_walfs() { # extra args
    "$WALFS" --config /dev/null --archive "file://$WORK/archive" --cache-dir "$WORK/cache" \
        receive -d "$CONN" --slot walfs_bench --create-slot -s 1s "$@" >>"$WORK/walfs.log" 2>&1 &
    RPID=$!
}
start_pgrw() { # extra args
    mkdir -p "$WORK/pgrw" && chown postgres "$WORK/pgrw"
    runuser -u postgres -- "$PGBIN/pg_receivewal" -d "$CONN application_name=walfs" -D "$WORK/pgrw" \
        -S pgrw_bench -s 1 "$@" >>"$WORK/pgrw.log" 2>&1 &
    RPID=$!
}
wait_streaming() { # application_name
    for _ in $(seq 1 200); do
        [ "$(q "select count(*) from pg_stat_replication where application_name = '$1'")" = 1 ] && return 0
        sleep 0.1
    done
    echo "receiver $1 never connected" >&2; tail "$WORK"/*.log >&2; exit 1
}

# --- 1. catch-up throughput -------------------------------------------------------------
q "select pg_create_physical_replication_slot('walfs_bench', true)" >/dev/null
runuser -u postgres -- "$PGBIN/pg_receivewal" -d "$CONN" -S pgrw_bench --create-slot >/dev/null 2>&1
start_walfs; wait_streaming walfs; stop_receiver
start_pgrw; wait_streaming walfs; stop_receiver
START=$(q "select pg_current_wal_lsn()")
SCALE=$(( WAL_MB / 12 > 0 ? WAL_MB / 12 : 1 ))  # pgbench -i writes about 12 MiB of WAL per scale unit
runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -p 5460 -i -q -s "$SCALE" postgres >/dev/null 2>&1
q "select pg_switch_wal()" >/dev/null
END=$(q "select pg_current_wal_lsn()")
BYTES=$(q "select pg_wal_lsn_diff('$END', '$START')::bigint")
catch_up() { # name start-function
    local t0 t1
    t0=$(now)
    "$2"
    for _ in $(seq 1 6000); do
        [ "$(q "select coalesce(bool_or(flush_lsn >= '$END'), false) from pg_stat_replication where application_name = 'walfs'")" = t ] && break
        sleep 0.05
    done
    t1=$(now)
    stop_receiver
    echo "$1 $(echo "$t1 - $t0" | bc -l)"
}
W=$(catch_up walfs start_walfs)
P=$(catch_up pg_receivewal start_pgrw)
tw=$(echo "$W" | cut -d' ' -f2); tp=$(echo "$P" | cut -d' ' -f2)
MIB=$(echo "$BYTES / 1048576" | bc -l)

# --- 2. synchronous commit TPS ----------------------------------------------------------
runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -p 5460 -i -q -s 10 postgres >/dev/null 2>&1
TX=""
tps() { runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -p 5460 -c 4 -j 2 -T "$TPS_SECONDS" postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1; }
# The receiver process itself (pg_receivewal runs under runuser).
receiver_pid() { local c; c=$(pgrep -P "$RPID" pg_receivewal || true); echo "${c:-$RPID}"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# TPS of one run, and the receiver's CPU milliseconds per 1000 transactions after a colon.
timed_tps() {
    local pid c0 t c1
    pid=$(receiver_pid); c0=$(cpu_ticks "$pid")
    t=$(tps); c1=$(cpu_ticks "$pid")
    echo "$t:$(echo "($c1 - $c0) * 1000 / $(getconf CLK_TCK) * 1000 / ($t * $TPS_SECONDS)" | bc -l | xargs printf '%.0f')"
}
sync_names() { q "alter system set synchronous_standby_names = '$1'" >/dev/null; q "select pg_reload_conf()" >/dev/null; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
A_RUNS=""; W_RUNS=""; P_RUNS=""; W_CPU=""; P_CPU=""
for round in $(seq 1 "$ROUNDS"); do
    sync_names ''
    A_RUNS="$A_RUNS $(tps)"
    sync_names walfs
    start_walfs --synchronous; wait_streaming walfs
    r=$(timed_tps); W_RUNS="$W_RUNS ${r%%:*}"; W_CPU="$W_CPU ${r##*:}"; stop_receiver
    start_pgrw --synchronous; wait_streaming walfs
    r=$(timed_tps); P_RUNS="$P_RUNS ${r%%:*}"; P_CPU="$P_CPU ${r##*:}"; stop_receiver
    echo "round $round/$ROUNDS: async$(echo "$A_RUNS" | awk '{print " "$NF}') walfs$(echo "$W_RUNS" | awk '{print " "$NF}') pg_receivewal$(echo "$P_RUNS" | awk '{print " "$NF}')" >&2
done
PROFILES=""
if [ "${PROFILE:-0}" != 0 ]; then
    profile() { # name start-function
        local out="$WORK/strace-$1" n
        "$2" --synchronous; wait_streaming walfs
        if [ "${PROFILE:-0}" = perf ]; then
            perf record -q -g -o "$out.perf" -p "$(receiver_pid)" 2>/dev/null &
        else
            strace -c -f -o "$out" -p "$(receiver_pid)" &
        fi
        local spid=$!
        sleep 0.5
        n=$(runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -p 5460 -c 4 -j 2 -T "$TPS_SECONDS" postgres 2>/dev/null | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
        kill -INT "$spid"; wait "$spid" 2>/dev/null || true
        stop_receiver
        if [ "${PROFILE:-0}" = perf ]; then
            echo "== $1: perf report (self time, top 30)"
            perf report -q -i "$out.perf" --no-children -g none --sort ${PERF_SORT:-dso,symbol} 2>/dev/null | grep -v '^$' | grep '%' | head -30
            return
        fi
        PROFILES="$PROFILES$(printf '  %-14s per transaction:' "$1")"
        for call in fsync fdatasync write pwrite64 sendto recvfrom read epoll_wait futex; do
            local c
            c=$(awk -v c="$call" '$NF == c {print ($4 ~ /^[0-9]+$/) ? $4 : $3}' "$out" | head -1)
            [ -n "$c" ] && PROFILES="$PROFILES $(printf '%s %.2f' "$call" "$(echo "$c / $n" | bc -l)")"
        done
        PROFILES="$PROFILES"$'\n'
    }
    profile walfs start_walfs
    profile pg_receivewal start_pgrw
fi
sync_names ''
T_ASYNC=$(echo "$A_RUNS" | median); T_WALFS=$(echo "$W_RUNS" | median); T_PGRW=$(echo "$P_RUNS" | median)
C_WALFS=$(echo "$W_CPU" | median); C_PGRW=$(echo "$P_CPU" | median)

echo
echo "walfs receive vs pg_receivewal, $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $("$PGBIN/postgres" --version)"
printf 'catch-up of %.0f MiB of WAL:\n' "$MIB"
printf '  %-26s %8.2f s %9.1f MiB/s\n' "walfs receive" "$tw" "$(echo "$MIB / $tw" | bc -l)"
printf '  %-26s %8.2f s %9.1f MiB/s\n' "pg_receivewal" "$tp" "$(echo "$MIB / $tp" | bc -l)"
printf '  walfs / pg_receivewal: %.2fx\n' "$(echo "$tp / $tw" | bc -l)"
echo "pgbench TPS (-c 4, ${TPS_SECONDS}s, median of $ROUNDS alternating rounds; runs: walfs$W_RUNS, pg_receivewal$P_RUNS):"
printf '  %-40s %10.1f\n' "no synchronous standby" "$T_ASYNC"
printf '  %-40s %10.1f   receiver CPU %s ms per 1000 transactions\n' "walfs receive --synchronous" "$T_WALFS" "$C_WALFS"
printf '  %-40s %10.1f   receiver CPU %s ms per 1000 transactions\n' "pg_receivewal --synchronous" "$T_PGRW" "$C_PGRW"
printf '  walfs / pg_receivewal: %.2fx\n' "$(echo "$T_WALFS / $T_PGRW" | bc -l)"
if [ -n "$PROFILES" ]; then echo "system calls per transaction (strace -c -f, one run each, untimed):"; printf '%s' "$PROFILES"; fi
