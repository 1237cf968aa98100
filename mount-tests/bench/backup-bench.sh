#!/usr/bin/env bash
# walfs backup / walfs restore beside pg_basebackup and pgBackRest, on one real PostgreSQL,
# in one run.
#
#   bash mount-tests/bench/backup-bench.sh [SCALE] [RUNS]
#
# One database of pgbench scale SCALE (default 200: about 3 GiB), then, RUNS times (default
# 1), alternating:
#   - walfs backup into a local keyed archive (zstd level 3 + AES-256-GCM, 16 MiB chunks);
#   - pg_basebackup -Ft -z (gzip) to a local directory;
#   - pgbackrest backup --type=full into a local repository (zst, aes-256-cbc, process-max 2);
# and the restores: walfs restore and pgbackrest restore into empty directories. Wall time
# and peak RSS from /usr/bin/time (pgBackRest's main process; its workers are not counted),
# bytes stored from du. Reported as ratios to the peers, the minimum of the runs.
# Needs root and what .ci/setup installs (postgresql, pgbackrest); builds walfs in release.
set -euo pipefail

SCALE=${1:-200}
RUNS=${2:-1}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
command -v pgbackrest >/dev/null || { echo "needs pgbackrest (apt-get install pgbackrest)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }
WORK=$(mktemp -d /var/tmp/walfs-bbench.XXXXXX)
chmod 0755 "$WORK"
chown postgres "$WORK"  # the server writes its log and socket here
cleanup() {
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
(cd "$ROOT" && cargo build --release --bin walfs -q)
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/walfs" "$WORK/walfs"
chmod 0755 "$WORK/walfs"
mkdir -p "$WORK/archive" "$WORK/pgbr" "$WORK/keys"
"$WORK/walfs" keygen "$WORK/keys/key" >/dev/null 2>&1
chown -R postgres "$WORK/archive" "$WORK/pgbr" "$WORK/keys"
WALFS="$WORK/walfs --config /dev/null --archive file://$WORK/archive --key-file $WORK/keys/key"
cat >"$WORK/pgbackrest.conf" <<EOF
[global]
repo1-path=$WORK/pgbr
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=walfs-bench-passphrase-0123456789
compress-type=zst
process-max=2
start-fast=y
log-level-console=warn
log-path=$WORK/pgbr
lock-path=$WORK/pgbr

[bench]
pg1-path=$WORK/data
pg1-socket-path=$WORK
pg1-port=5461
EOF
chown postgres "$WORK/pgbackrest.conf"
PGBR="pgbackrest --config=$WORK/pgbackrest.conf --stanza=bench"

install -d -o postgres -m 0700 "$WORK/data"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/data" -A trust --no-sync >/dev/null
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = 5461
max_wal_size = 4GB
archive_mode = on
archive_command = '$WALFS push %p && $PGBR archive-push %p'
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
runuser -u postgres -- $PGBR stanza-create >/dev/null
echo "pgbench -i -s $SCALE ..." >&2
runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -p 5461 -i -q -s "$SCALE" postgres >/dev/null 2>&1
DBSIZE=$(runuser -u postgres -- psql -h "$WORK" -p 5461 -XAtc "select pg_database_size('postgres')" postgres)
CONN="host=$WORK port=5461 user=postgres"

# time_rss LABEL CMD...: runs as postgres; prints "LABEL seconds peak_kib".
time_rss() {
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$WORK/time.out" runuser -u postgres -- "$@" >/dev/null 2>"$WORK/$label.err" \
        || { echo "$label failed:" >&2; cat "$WORK/$label.err" >&2; exit 1; }
    echo "$label $(cat "$WORK/time.out")"
}
RESULTS=""
for run in $(seq 1 "$RUNS"); do
    rm -rf "$WORK/bb" && mkdir "$WORK/bb" && chown postgres "$WORK/bb"
    RESULTS+="$(time_rss walfs_backup $WALFS backup -d "$CONN")"$'\n'
    RESULTS+="$(time_rss pg_basebackup "$PGBIN/pg_basebackup" -h "$WORK" -p 5461 -Ft -z -D "$WORK/bb/run$run" -c fast)"$'\n'
    RESULTS+="$(time_rss pgbackrest_backup $PGBR backup --type=full)"$'\n'
    for d in wr pr; do rm -rf "$WORK/$d"; install -d -o postgres -m 0700 "$WORK/$d"; done
    RESULTS+="$(time_rss walfs_restore $WALFS restore "$WORK/wr")"$'\n'
    RESULTS+="$(time_rss pgbackrest_restore $PGBR --pg1-path="$WORK/pr" restore)"$'\n'
    echo "run $run/$RUNS done" >&2
done
W_STORED=$(du -sb "$WORK/archive/backups" | cut -f1)
B_STORED=$(du -sb "$WORK/bb" | cut -f1)
P_STORED=$(du -sb "$WORK/pgbr/backup" | cut -f1)
best() { echo "$RESULTS" | awk -v l="$1" '$1 == l {print $2, $3}' | sort -g | head -1; }
read -r WB WBR <<<"$(best walfs_backup)"
read -r BB BBR <<<"$(best pg_basebackup)"
read -r PB PBR <<<"$(best pgbackrest_backup)"
read -r WR WRR <<<"$(best walfs_restore)"
read -r PR PRR <<<"$(best pgbackrest_restore)"
mib() { echo "scale=1; $1 / 1048576" | bc; }
echo
echo "base backups, $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $("$PGBIN/postgres" --version), database $(mib "$DBSIZE") MiB, best of $RUNS"
printf '  %-36s %8s %12s %12s\n' "" "seconds" "stored MiB" "peak RSS MiB"
printf '  %-36s %8.1f %12.1f %12.1f\n' "walfs backup (zstd 3 + AES-GCM)" "$WB" "$(mib $((W_STORED / RUNS)))" "$(echo "$WBR/1024" | bc -l)"
printf '  %-36s %8.1f %12.1f %12.1f\n' "pg_basebackup -Ft -z (gzip)" "$BB" "$(mib $((B_STORED / RUNS)))" "$(echo "$BBR/1024" | bc -l)"
printf '  %-36s %8.1f %12.1f %12.1f\n' "pgbackrest backup (zst + AES-CBC)" "$PB" "$(mib $((P_STORED / RUNS)))" "$(echo "$PBR/1024" | bc -l)"
printf '  walfs backup time vs pg_basebackup: %.2fx, vs pgbackrest: %.2fx (above 1: walfs faster)\n' \
    "$(echo "$BB / $WB" | bc -l)" "$(echo "$PB / $WB" | bc -l)"
printf '  %-36s %8.1f %12s %12.1f\n' "walfs restore" "$WR" "" "$(echo "$WRR/1024" | bc -l)"
printf '  %-36s %8.1f %12s %12.1f\n' "pgbackrest restore" "$PR" "" "$(echo "$PRR/1024" | bc -l)"
printf '  walfs restore time vs pgbackrest: %.2fx (above 1: walfs faster)\n' "$(echo "$PR / $WR" | bc -l)"
