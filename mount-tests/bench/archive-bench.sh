#!/usr/bin/env bash
# Push/fetch throughput of walfs beside plain cp, on real WAL from a pgbench run.
#
#   bash mount-tests/bench/archive-bench.sh [SEGMENTS] [RUNS]
#
# Makes SEGMENTS (default 64) real 16 MiB segments with Debian's PostgreSQL and pgbench, then,
# RUNS times (default 3) each, times: cp into a local directory (the baseline), walfs push into
# a local archive without and with a key, walfs fetch out of both, and cp + fsync. Prints the
# median MiB/s of each and its ratio to plain cp, and the compression ratio. Needs root (runs
# PostgreSQL as the postgres user) and what .ci/setup installs.
set -euo pipefail

SEGMENTS=${1:-64}
RUNS=${2:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/walfs-bench.XXXXXX)
chmod 0777 "$WORK"
PGPID=""
MPID=""
cleanup() {
    stop_mount
    if [ -n "$PGPID" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "building walfs (release)..." >&2
(cd "$ROOT" && cargo build --release --bin walfs -q)
WALFS="${CARGO_TARGET_DIR:-$ROOT/target}/release/walfs"

echo "making $SEGMENTS real WAL segments with pgbench..." >&2
mkdir -p "$WORK/wal" && chmod 0777 "$WORK/wal"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/data" -A trust >/dev/null
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = 5432
archive_mode = on
archive_command = 'cp %p $WORK/wal/%f'
max_wal_size = 4GB
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
PGPID=started
psql_() { runuser -u postgres -- psql -h "$WORK" -XAtq -c "$1" postgres; }
# Initialisation (COPY, index builds) and transactions, round after round, until enough
# segments are archived (bounded).
for _ in $(seq 1 40); do
    n=$(find "$WORK/wal" -maxdepth 1 -name '[0-9A-F]*' -size 16M | wc -l)
    [ "$n" -ge "$SEGMENTS" ] && break
    runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -i -q -s 10 postgres >/dev/null 2>&1
    runuser -u postgres -- "$PGBIN/pgbench" -h "$WORK" -c 4 -j 2 -T 3 postgres >/dev/null 2>&1
done
psql_ "select pg_switch_wal()" >/dev/null
sleep 2
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null
PGPID=""
mkdir -p "$WORK/set"
find "$WORK/wal" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' -size 16M | sort | head -n "$SEGMENTS" \
    | xargs -I{} mv {} "$WORK/set/"
have=$(ls "$WORK/set" | wc -l)
[ "$have" -ge "$SEGMENTS" ] || { echo "only $have segments were made" >&2; exit 1; }
MIB=$((SEGMENTS * 16))
"$WALFS" keygen "$WORK/key" >/dev/null

now() { date +%s.%N; }
start_mount() { # ARCHIVE_URL [more walfs args]
    mkdir -p "$WORK/mnt"
    rm -rf "$WORK/cache"
    "$WALFS" --config /dev/null --archive "$1" "${@:2}" --cache-dir "$WORK/cache" mount "$WORK/mnt" 2>>"$WORK/mount.log" &
    MPID=$!
    for _ in $(seq 1 100); do mountpoint -q "$WORK/mnt" && return 0; sleep 0.1; done
    cat "$WORK/mount.log" >&2; exit 1
}
stop_mount() {
    if [ -n "$MPID" ]; then kill -TERM "$MPID" 2>/dev/null || true; wait "$MPID" 2>/dev/null || true; MPID=""; fi
}
# time_cmd NAME SETUP COMMAND: runs SETUP, then times COMMAND over every segment.
declare -A RESULTS
measure() {
    local label=$1 setup=$2 body=$3 times=()
    for _ in $(seq 1 "$RUNS"); do
        eval "$setup"
        sync
        local t0 t1
        t0=$(now)
        for f in $(ls "$WORK/set"); do eval "$body"; done
        t1=$(now)
        times+=("$(echo "$t1 - $t0" | bc -l)")
    done
    RESULTS[$label]=$(printf '%s\n' "${times[@]}" | sort -g | sed -n "$(((RUNS + 1) / 2))p")
}

measure cp 'rm -rf $WORK/dst; mkdir $WORK/dst' 'cp $WORK/set/$f $WORK/dst/$f'
measure "cp+fsync" 'rm -rf $WORK/dst; mkdir $WORK/dst' 'dd if=$WORK/set/$f of=$WORK/dst/$f bs=1M conv=fsync status=none'
measure "push" 'rm -rf $WORK/a1' '$WALFS --archive file://$WORK/a1 push $WORK/set/$f'
measure "push+key" 'rm -rf $WORK/a2' '$WALFS --archive file://$WORK/a2 --key-file $WORK/key push $WORK/set/$f'
measure "fetch" 'rm -rf $WORK/dst; mkdir $WORK/dst' '$WALFS --archive file://$WORK/a1 fetch $f $WORK/dst/$f'
measure "fetch+key" 'rm -rf $WORK/dst; mkdir $WORK/dst' '$WALFS --archive file://$WORK/a2 --key-file $WORK/key fetch $f $WORK/dst/$f'
# Through the mount: cp in (fresh archive each run), cp out cold (fresh mount and cache each
# run), cp out warm (the same files again in the same mount).
measure "mount-cp-in" 'stop_mount; rm -rf $WORK/a3; start_mount file://$WORK/a3' 'cp $WORK/set/$f $WORK/mnt/$f'
measure "mount-cp-in+key" 'stop_mount; rm -rf $WORK/a4; start_mount file://$WORK/a4 --key-file $WORK/key' 'cp $WORK/set/$f $WORK/mnt/$f'
measure "mount-cold" 'stop_mount; start_mount file://$WORK/a1; rm -rf $WORK/dst; mkdir $WORK/dst' 'cp $WORK/mnt/$f $WORK/dst/$f'
measure "mount-cold+key" 'stop_mount; start_mount file://$WORK/a2 --key-file $WORK/key; rm -rf $WORK/dst; mkdir $WORK/dst' 'cp $WORK/mnt/$f $WORK/dst/$f'
measure "mount-warm+key" 'rm -rf $WORK/dst; mkdir $WORK/dst' 'cp $WORK/mnt/$f $WORK/dst/$f'
stop_mount
cmp -s "$WORK/set/$(ls "$WORK/set" | tail -1)" "$WORK/dst/$(ls "$WORK/set" | tail -1)" || { echo "fetched bytes differ" >&2; exit 1; }

stored=$(du -sb --apparent-size "$WORK/a2/wal" | cut -f1)
echo
echo "walfs archive benchmark: $SEGMENTS x 16 MiB real pgbench segments, median of $RUNS runs"
echo "machine: $(nproc) cores, $(uname -r), $(lscpu | sed -n 's/^Model name: *//p')"
printf '%-16s %8s %9s %9s %8s\n' what seconds MiB/s seg/s "vs cp"
base=${RESULTS[cp]}
for k in cp cp+fsync push push+key fetch fetch+key mount-cp-in mount-cp-in+key mount-cold mount-cold+key mount-warm+key; do
    t=${RESULTS[$k]}
    printf '%-16s %8.2f %9.1f %9.1f %7.2fx\n' "$k" "$t" "$(echo "$MIB / $t" | bc -l)" "$(echo "$SEGMENTS / $t" | bc -l)" "$(echo "$base / $t" | bc -l)"
done
printf 'compression: %d MiB of WAL stored in %.1f MiB (%.2fx)\n' "$MIB" "$(echo "$stored / 1048576" | bc -l)" \
    "$(echo "$MIB * 1048576 / $stored" | bc -l)"
