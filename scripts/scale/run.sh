#!/usr/bin/env bash
# The capacity model's measurements (CAPACITY.md): an index of N objects written straight into
# PostgreSQL, then nodes on loopback against one SeaweedFS and one PostgreSQL (started by
# deriva-testkit/backends.sh in a temporary directory).
#
# 1. Fill (schema `scale`, created by a first node): N - N/10 leaves of 1000 bytes
#    (`generate_series`, no bytes in the object store), N/10 real recipes with two edges each
#    (depths 1 to 3, over 3 % of the leaves; written by `deriva-core`'s example `scale-fill` as
#    COPY text), pins on 1 % of the depth-3 recipes and on every 1000th leaf. Prints the rows and
#    `pg_total_relation_size` per table, and the bytes per row.
# 2. GC: one node with --gc-min-grace 0s; `deriva gc --dry-run --grace 0s`: its duration, the
#    node's RSS before and peak RSS during (VmHWM, reset first through /proc/PID/clear_refs).
# 3. migrate: `deriva-server migrate --dry-run` from the index to an empty local directory,
#    under /usr/bin/time -v: its duration and peak RSS (wait4's rusage).
# 4. Per RPC kind (put-leaf, leaf-get, cached-get, compute-get; `deriva bench -n COUNT -c 8`,
#    1 KiB): a fresh node per kind. Around the bench: the node's backend calls
#    (`deriva_backend_request_duration_seconds_count`, by backend: `postgres` calls, `s3`
#    requests) and CPU (utime + stime), PostgreSQL's CPU; around the node's whole life (start to
#    exit, when PostgreSQL has flushed its sessions' statistics): rows read
#    (`pg_stat_user_tables`, seq_tup_read + idx_tup_fetch) and transactions (`pg_stat_database`,
#    xact_commit + xact_rollback), less those of a node started and stopped with no request
#    ("idle"). Each divided by the requests.
# 5. Fleet: for K in 1 2 4 8, K nodes; per workload (leaf-get, compute-get) one `deriva bench`
#    per node, all at once for SECONDS; the sum of their req/s, and PostgreSQL's CPU per request.
#
# Usage: scripts/scale/run.sh [N] [COUNT] [SECONDS]   (defaults: 20000 2000 5)
# SCALE_KEEP=1 keeps the work directory (logs, raw results) and prints its path.
# SCALE_STORE_ONLY=1 stops after steps 1 to 3 (fill, GC, migrate).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-20000}
count=${2:-2000}
secs=${3:-5}
case "$n$count$secs" in *[!0-9]*) echo "scale: N, COUNT and SECONDS are whole numbers" >&2; exit 2 ;; esac
[ "$n" -ge 1000 ] || { echo "scale: N is at least 1000" >&2; exit 2; }
readonly recipes=$((n / 10)) leaves=$((n - n / 10))
readonly schema=scale app=deriva-scale ready_secs=120
readonly workloads=(put-leaf leaf-get cached-get compute-get)
readonly fleet_sizes=(1 2 4 8) fleet_workloads=(leaf-get compute-get)

cargo build --release -q -p deriva-server -p deriva-cli --bins
cargo build --release -q -p deriva-core --example scale-fill
bin=$PWD/target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
BENCH_KEEP=${SCALE_KEEP:-}
bench_begin scale
backends=$work/backends
node_pids=()
bench_stop() {
    if [ "${#node_pids[@]}" -gt 0 ]; then
        kill "${node_pids[@]}" 2>/dev/null || true
        wait "${node_pids[@]}" 2>/dev/null || true
    fi
    deriva-testkit/backends.sh stop "$backends" >/dev/null
}
clk_tck=$(getconf CLK_TCK)

backends_start
pg_url=$DERIVA_TEST_PG_URL
blob_store=s3://$DERIVA_TEST_S3_BUCKET/scale
index_url="$pg_url?application_name=$app"

sql() { psql "$pg_url" -X -q -v ON_ERROR_STOP=1 -At "$@"; }

# start_node I [FLAG...]: node I on free ports, on the shared store; sets port[I], metrics[I],
# pid[I] and waits until it answers.
declare -A port metrics pid
start_node() {
    local i=$1 deadline
    shift
    port[$i]=$(free_port)
    metrics[$i]=$(free_port)
    env RUST_LOG=warn "$bin/deriva-server" --listen "127.0.0.1:${port[$i]}" \
        --metrics-addr "127.0.0.1:${metrics[$i]}" --data-dir "$work/node$i" \
        --blob-store "$blob_store" --index "$index_url" --index-schema "$schema" "$@" \
        2>>"$work/node$i.log" &
    pid[$i]=$!
    node_pids+=("$!")
    deadline=$((SECONDS + ready_secs))
    until "$bin/deriva" --server "http://127.0.0.1:${port[$i]}" status >/dev/null 2>&1; do
        if ! alive "${pid[$i]}" || [ "$SECONDS" -ge "$deadline" ]; then
            echo "scale: node $i did not become ready; the end of its log:" >&2
            tail -n 20 "$work/node$i.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# stop_nodes: stops every node (TERM, then wait), then waits until PostgreSQL has no session of
# theirs left (an ended session has flushed its statistics).
stop_nodes() {
    if [ "${#node_pids[@]}" -gt 0 ]; then
        kill "${node_pids[@]}"
        wait "${node_pids[@]}" 2>/dev/null || true
    fi
    node_pids=()
    local deadline=$((SECONDS + 60))
    until [ "$(sql -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = '$app'")" = 0 ]; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "scale: the nodes' sessions did not end" >&2; exit 1; }
        sleep 0.1
    done
}

# Rows read from the schema's tables and transactions of the database so far, on one line.
pg_reads() {
    sql -F ' ' -c "SELECT pg_stat_clear_snapshot()" -c "
        SELECT (SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0)
                FROM pg_stat_user_tables WHERE schemaname = '$schema'),
               (SELECT xact_commit + xact_rollback FROM pg_stat_database
                WHERE datname = current_database())" | tail -n 1
}

# Backend calls of node I so far: "postgres S3" (the counts of every op's duration histogram).
backend_calls() {
    curl -sf --max-time 10 "http://127.0.0.1:${metrics[$1]}/metrics" | awk '
        $1 ~ /^deriva_backend_request_duration_seconds_count\{/ {
            if ($1 ~ /backend="postgres"/) pg += $NF
            if ($1 ~ /backend="s3"/) s3 += $NF
        }
        END { printf "%.0f %.0f\n", pg, s3 }'
}

# A field of /proc/PID/status, in KiB (VmRSS, VmHWM).
vm_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

echo "N=$n (leaves $leaves, recipes $recipes) COUNT=$count SECONDS=$secs cores=$(nproc) commit=$(git rev-parse --short HEAD)"

# 1. Fill.
start_node 0
stop_nodes
t0=$(date +%s.%N)
sql -c "INSERT INTO $schema.leaves (addr, size)
        SELECT decode(lpad(to_hex(i), 64, '0'), 'hex'), 1000 FROM generate_series(1, $leaves) i"
t1=$(date +%s.%N)
"$bin/examples/scale-fill" "$leaves" "$recipes" recipes |
    sql -c "\\copy $schema.recipes (addr, encoding, depth) FROM STDIN"
"$bin/examples/scale-fill" "$leaves" "$recipes" edges |
    sql -c "\\copy $schema.edges (input, recipe) FROM STDIN"
"$bin/examples/scale-fill" "$leaves" "$recipes" pins |
    sql -c "\\copy $schema.pins (addr) FROM STDIN"
sql -c "INSERT INTO $schema.pins (addr)
        SELECT decode(lpad(to_hex(i), 64, '0'), 'hex') FROM generate_series(1, $leaves, 1000) i"
t2=$(date +%s.%N)
sql -c "VACUUM ANALYZE"
t3=$(date +%s.%N)
echo
echo "== fill: leaves $(python3 -c "print(f'{$t1 - $t0:.1f}')") s, recipes + edges + pins $(python3 -c "print(f'{$t2 - $t1:.1f}')") s, VACUUM ANALYZE $(python3 -c "print(f'{$t3 - $t2:.1f}')") s"
printf '%-8s %12s %14s %10s\n' table rows bytes bytes/row
for table in leaves recipes edges pins; do
    sql -F ' ' -c "SELECT count(*), pg_total_relation_size('$schema.$table') FROM $schema.$table" |
        { read -r rows bytes; printf '%-8s %12d %14d %10.1f\n' "$table" "$rows" "$bytes" \
            "$(python3 -c "print($bytes / max($rows, 1))")"; }
done
echo "database $(sql -c "SELECT pg_database_size(current_database())") bytes"

# 2. GC dry run.
start_node 1 --gc-min-grace 0s
rss=$(vm_kib "${pid[1]}" VmRSS)
echo 5 >"/proc/${pid[1]}/clear_refs"
t0=$(date +%s.%N)
"$bin/deriva" --server "http://127.0.0.1:${port[1]}" gc --dry-run --grace 0s >"$work/gc.out"
t1=$(date +%s.%N)
hwm=$(vm_kib "${pid[1]}" VmHWM)
stop_nodes
echo
echo "== gc --dry-run --grace 0s: $(python3 -c "print(f'{$t1 - $t0:.2f}')") s, node RSS before $((rss / 1024)) MiB, peak $((hwm / 1024)) MiB (+$(((hwm - rss) / 1024)) MiB)"
sed 's/^/  /' "$work/gc.out"

# 3. migrate --dry-run.
echo
status=0
/usr/bin/time -v -o "$work/migrate.time" "$bin/deriva-server" migrate --blob-store "$blob_store" \
    --index "$index_url" --index-schema "$schema" --to-data-dir "$work/migrated" --dry-run \
    --no-progress --json >"$work/migrate.json" 2>"$work/migrate.log" || status=$?
peak=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/migrate.time")
elapsed=$(awk -F': ' '/Elapsed \(wall clock\)/ { print $2 }' "$work/migrate.time")
echo "== migrate --dry-run: exit $status, $elapsed (m:ss), peak RSS $((peak / 1024)) MiB"
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
for kind in ("leaves", "recipes", "pins"):
    c = r.get(kind, {})
    print(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
' "$work/migrate.json" 2>/dev/null || tail -n 5 "$work/migrate.log" | sed 's/^/  /'

[ "${SCALE_STORE_ONLY:-}" = 1 ] && exit 0

# 4. Per RPC kind, a fresh node each.
echo
echo "== per request (COUNT=$count, 8 clients, 1 KiB; rows and transactions less an idle node's)"
results=$work/per-request.tsv
measure() {
    local workload=$1 reads0 rows0 xacts0 calls0 pg0 s30 cpu0 weed0 pgcpu0 out requests=0 rps=0
    local reads1 rows1 xacts1 calls1 pg1 s31 cpu1 weed1 pgcpu1
    read -r rows0 xacts0 < <(pg_reads)
    start_node 1
    read -r pg0 s30 < <(backend_calls 1)
    cpu0=$(cpu_ticks "${pid[1]}")
    read -r weed0 pgcpu0 < <(backend_ticks "$backends")
    if [ "$workload" != idle ]; then
        out=$("$bin/deriva" --server "http://127.0.0.1:${port[1]}" bench -w "$workload" \
            -n "$count" -c 8 --json)
        read -r requests rps < <(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
if r["errors"]:
    print("scale:", r["errors"], "errors, the first:", r["first_error"], file=sys.stderr)
print(r["requests"], r["throughput_rps"])' "$out")
    fi
    read -r weed1 pgcpu1 < <(backend_ticks "$backends")
    cpu1=$(cpu_ticks "${pid[1]}")
    read -r pg1 s31 < <(backend_calls 1)
    stop_nodes
    read -r rows1 xacts1 < <(pg_reads)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$workload" "$requests" "$rps" \
        $((pg1 - pg0)) $((s31 - s30)) $((rows1 - rows0)) $((xacts1 - xacts0)) \
        $((cpu1 - cpu0)) $((pgcpu1 - pgcpu0)) >>"$results"
}
for workload in idle "${workloads[@]}"; do
    measure "$workload"
done
python3 - "$results" "$clk_tck" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
tck = int(sys.argv[2])
idle = next(r for r in rows if r[0] == "idle")
idle_rows, idle_xacts = int(idle[5]), int(idle[6])
print(f"  idle node (start, one Status, stop): {idle_rows} rows read, {idle_xacts} transactions")
hdr = ("workload", "requests", "req/s", "pg calls", "s3 reqs", "rows read", "xacts", "node CPU µs", "pg CPU µs")
print("  " + " ".join(f"{h:>12}" for h in hdr))
for w, req, rps, pg, s3, rd, xa, cpu, pgcpu in rows:
    if w == "idle":
        continue
    n = int(req)
    per = lambda v: v / n
    print("  " + " ".join(f"{v:>12}" for v in (
        w, n, f"{float(rps):.0f}", f"{per(int(pg)):.2f}", f"{per(int(s3)):.2f}",
        f"{per(int(rd) - idle_rows):.2f}", f"{per(int(xa) - idle_xacts):.2f}",
        f"{per(int(cpu)) * 1e6 / tck:.0f}", f"{per(int(pgcpu)) * 1e6 / tck:.0f}")))
PY

# 5. Fleet throughput.
echo
echo "== fleet: K nodes, one \`deriva bench -c 8 -d ${secs}s\` per node at once (the 2 cores are shared by all)"
printf '  %-4s %-12s %10s %8s %12s\n' K workload 'sum req/s' errors 'pg CPU µs/req'
for k in "${fleet_sizes[@]}"; do
    for i in $(seq "$k"); do
        start_node "$i"
    done
    for workload in "${fleet_workloads[@]}"; do
        read -r weed0 pgcpu0 < <(backend_ticks "$backends")
        bench_pids=()
        for i in $(seq "$k"); do
            "$bin/deriva" --server "http://127.0.0.1:${port[$i]}" bench -w "$workload" \
                -d "${secs}s" -c 8 --json >"$work/fleet-$k-$workload-$i.json" &
            bench_pids+=("$!")
        done
        wait "${bench_pids[@]}"
        bench_pids=()
        read -r weed1 pgcpu1 < <(backend_ticks "$backends")
        python3 - "$k" "$workload" "$((pgcpu1 - pgcpu0))" "$clk_tck" "$work"/fleet-"$k-$workload"-*.json <<'PY'
import json, sys
k, w, pgcpu, tck = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rs = [json.load(open(p)) for p in sys.argv[5:]]
rps = sum(r["throughput_rps"] for r in rs)
req = sum(r["requests"] for r in rs)
err = sum(r["errors"] for r in rs)
print(f"  {k:<4} {w:<12} {rps:>10.0f} {err:>8} {pgcpu * 1e6 / tck / max(req, 1):>12.0f}")
PY
    done
    stop_nodes
done
