#!/usr/bin/env bash
# What the remote backend costs, measured side by side on one machine: three release servers
# on free ports, driven in turn by `deriva bench`:
#
# - local:       the default backend (redb in its own --data-dir);
# - remote:      leaves in SeaweedFS over S3 (--blob-store s3://BUCKET/bench-remote), the index in
#                PostgreSQL (a schema of its own), output tier none, local read-through cache on
#                (default size);
# - remote-tier: the same with its own prefix and schema, and --output-tier blob-store.
#
# SeaweedFS and PostgreSQL come from deriva-testkit/backends.sh in a temporary directory. For each
# workload (put-leaf, cached-get, compute-get, leaf-get; 1 KiB values) and each round, the
# three servers run in a shuffled order. Around each run the server's CPU time (utime + stime
# from /proc/PID/stat) gives server CPU microseconds per request. Prints per workload the
# medians per server (req/s, p50, CPU µs/request) and the ratios remote/local and
# remote-tier/remote, then the local read-through cache hit rate of `remote` after the leaf-get
# rounds, the mean backend call durations, and a compact table of everything.
#
# CPU per request counts everything the server process did during the run (all its threads),
# divided by the requests the bench reported: it includes the bench's setup (2 PutLeaf, 1
# PutRecipe, 1 Get), its connections, and for compute-get the untimed PutRecipe that precedes
# every timed Get. A remote server hands part of its work to SeaweedFS and PostgreSQL, so the
# CPU of those (every process of theirs, during the run) is reported beside it, per request
# too ("weed", "pg"); they idle between runs, but their background work (heartbeats,
# checkpoints, compaction) falls into whichever run it overlaps.
#
# Usage: scripts/bench-remote.sh [ROUNDS] [SECONDS] [CONCURRENCY]   (defaults: 5 5 8)
# BENCH_KEEP=1 keeps the work directory (server logs, raw results) and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
secs=${2:-5}
conc=${3:-8}
[ "$rounds" -ge 3 ] || { echo "at least 3 rounds" >&2; exit 2; }
readonly workloads=(put-leaf cached-get compute-get leaf-get)
readonly servers=(local remote remote-tier)
readonly size=1KiB
readonly ready_secs=60

cargo build --release -q -p deriva-server -p deriva-cli --bins
bin=$PWD/target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-remote
# The postgres user (backends.sh runs PostgreSQL as it when we are root) must reach
# $work/backends/pg through this directory.
chmod o+x "$work"
backends=$work/backends
declare -A pid port metrics
server_pids=()
bench_stop() {
    if [ "${#server_pids[@]}" -gt 0 ]; then
        kill "${server_pids[@]}" 2>/dev/null || true
        wait "${server_pids[@]}" 2>/dev/null || true
    fi
    deriva-testkit/backends.sh stop "$backends" >/dev/null
}
clk_tck=$(getconf CLK_TCK)

# The sum of every series of metric NAME (any labels) on the /metrics of server WHICH.
metric_sum() {
    curl -sf --max-time 10 "http://127.0.0.1:${metrics[$1]}/metrics" |
        awk -v name="$2" '$1 == name || index($1, name "{") == 1 { s += $NF } END { printf "%.0f\n", s }'
}

deriva-testkit/backends.sh start "$backends" >"$work/backends.out" 2>&1 ||
    { cat "$work/backends.out" >&2; exit 1; }
# shellcheck disable=SC1091 # written by backends.sh
. "$backends/env"

# start_server NAME [FLAG...]: a release server on free ports, its data and log in $work.
# Every server gets the AWS_* settings; only the remote ones read them. `env` execs the
# server, so $! is the server's own pid.
start_server() {
    local name=$1
    shift
    port[$name]=$(free_port)
    metrics[$name]=$(free_port)
    env RUST_LOG=warn AWS_ENDPOINT_URL="$DERIVA_TEST_S3_ENDPOINT" AWS_REGION=us-east-1 \
        AWS_ACCESS_KEY_ID="$DERIVA_TEST_AWS_ACCESS_KEY_ID" \
        AWS_SECRET_ACCESS_KEY="$DERIVA_TEST_AWS_SECRET_ACCESS_KEY" \
        "$bin/deriva-server" --listen "127.0.0.1:${port[$name]}" \
        --metrics-addr "127.0.0.1:${metrics[$name]}" --data-dir "$work/$name" "$@" \
        2>"$work/$name.log" &
    pid[$name]=$!
    server_pids+=($!)
}
start_server local
start_server remote --blob-store "s3://$DERIVA_TEST_S3_BUCKET/bench-remote" \
    --index "$DERIVA_TEST_PG_URL" --index-schema bench_remote --output-tier none
start_server remote-tier --blob-store "s3://$DERIVA_TEST_S3_BUCKET/bench-remote-tier" \
    --index "$DERIVA_TEST_PG_URL" --index-schema bench_remote_tier --output-tier blob-store

for name in "${servers[@]}"; do
    deadline=$((SECONDS + ready_secs))
    until "$bin/deriva" --server "http://127.0.0.1:${port[$name]}" status >/dev/null 2>&1; do
        if ! alive "${pid[$name]}" || [ "$SECONDS" -ge "$deadline" ]; then
            echo "bench-remote: server $name did not become ready; the end of its log:" >&2
            tail -n 20 "$work/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
done

results=$work/results.tsv
printf 'workload\tserver\tround\trps\tp50_us\tp99_us\trequests\terrors\tcpu_us_per_req\tweed_cpu_us_per_req\tpg_cpu_us_per_req\n' >"$results"

# One `deriva bench` run of WORKLOAD against server NAME in round ROUND; appends a line to
# $results.
run_one() {
    local workload=$1 name=$2 round=$3 before after weed0 pg0 weed1 pg1 out
    read -r weed0 pg0 < <(backend_ticks "$backends")
    before=$(cpu_ticks "${pid[$name]}")
    out=$("$bin/deriva" --server "http://127.0.0.1:${port[$name]}" bench --workload "$workload" \
        --duration "${secs}s" --concurrency "$conc" --size "$size" --json) ||
        { echo "bench-remote: deriva bench $workload against $name failed" >&2; tail -n 20 "$work/$name.log" >&2; exit 1; }
    after=$(cpu_ticks "${pid[$name]}")
    read -r weed1 pg1 < <(backend_ticks "$backends")
    python3 - "$workload" "$name" "$round" "$clk_tck" "$out" "$((after - before))" \
        "$((weed1 - weed0))" "$((pg1 - pg0))" >>"$results" <<'PY'
import json, sys
workload, name, round_, tck, out = sys.argv[1:6]
r = json.loads(out)
n = r["requests"]
server, weed, pg = (int(t) * 1e6 / int(tck) / n if n else float("nan") for t in sys.argv[6:])
if r["errors"]:
    print(f"bench-remote: {workload} on {name}: {r['errors']} errors, first: {r['first_error']}", file=sys.stderr)
print("\t".join(map(str, [workload, name, round_, f"{r['throughput_rps']:.1f}",
    r["latency_us"]["p50"], r["latency_us"]["p99"], n, r["errors"], f"{server:.1f}",
    f"{weed:.1f}", f"{pg:.1f}"])))
PY
}

# Medians and ratios from $results: `summary WORKLOAD` for one workload, `summary` for the
# compact table of all of them.
summary() {
    python3 - "$results" "$@" <<'PY'
import csv, statistics, sys
path, only = sys.argv[1], sys.argv[2:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
servers = ["local", "remote", "remote-tier"]
def med(w, s, k):
    v = [float(r[k]) for r in rows if r["workload"] == w and r["server"] == s]
    return statistics.median(v) if v else float("nan")
workloads = only or list(dict.fromkeys(r["workload"] for r in rows))
if only:
    w = only[0]
    for s in servers:
        per = [r for r in rows if r["workload"] == w and r["server"] == s]
        print(f"  {s:<11} rps {' '.join(str(round(float(r['rps']))) for r in per):<40}"
              f" p50 {' '.join(r['p50_us'] for r in per)}", file=sys.stderr)
# CPU µs per request of the server, then of SeaweedFS and of PostgreSQL during its runs.
hdr = ("workload", "server", "req/s", "p50 µs", "p99 µs", "CPU µs/req", "weed", "pg", "errors")
print(f"{hdr[0]:<12} {hdr[1]:<18} {hdr[2]:>9} {hdr[3]:>8} {hdr[4]:>8} {hdr[5]:>10} {hdr[6]:>6} {hdr[7]:>6} {hdr[8]:>6}")
for w in workloads:
    for s in servers:
        errs = sum(int(r["errors"]) for r in rows if r["workload"] == w and r["server"] == s)
        print(f"{w:<12} {s:<18} {med(w,s,'rps'):>9.0f} {med(w,s,'p50_us'):>8.0f} "
              f"{med(w,s,'p99_us'):>8.0f} {med(w,s,'cpu_us_per_req'):>10.0f} "
              f"{med(w,s,'weed_cpu_us_per_req'):>6.0f} {med(w,s,'pg_cpu_us_per_req'):>6.0f} {errs:>6}")
# CPU+backends: the server's CPU per request plus that of SeaweedFS and PostgreSQL.
print(f"{'ratio':<31} {'req/s':>9} {'p50':>8} {'p99':>8} {'CPU/req':>10} {'+backends':>9}")
total = lambda w, s: sum(med(w, s, k) for k in ("cpu_us_per_req", "weed_cpu_us_per_req", "pg_cpu_us_per_req"))
for w in workloads:
    for a, b in (("remote", "local"), ("remote-tier", "remote")):
        f = lambda k: med(w, a, k) / med(w, b, k)
        print(f"{w:<12} {a + '/' + b:<18} {f('rps'):>9.2f} {f('p50_us'):>8.2f} "
              f"{f('p99_us'):>8.2f} {f('cpu_us_per_req'):>10.2f} {total(w, a) / total(w, b):>9.2f}")
PY
}

echo "rounds=$rounds duration=${secs}s concurrency=$conc size=$size cores=$(nproc) clk_tck=$clk_tck"
echo "servers: local pid ${pid[local]}, remote pid ${pid[remote]}, remote-tier pid ${pid[remote-tier]}"
for workload in "${workloads[@]}"; do
    if [ "$workload" = leaf-get ]; then
        hits0=$(metric_sum remote deriva_local_cache_hits_total)
        misses0=$(metric_sum remote deriva_local_cache_misses_total)
    fi
    for round in $(seq "$rounds"); do
        # A fresh order each round, so drift in the machine's load spreads over all three.
        for name in $(shuf -e "${servers[@]}"); do
            run_one "$workload" "$name" "$round"
        done
    done
    echo
    echo "== $workload (medians of $rounds rounds)"
    summary "$workload"
done

hits=$(metric_sum remote deriva_local_cache_hits_total)
misses=$(metric_sum remote deriva_local_cache_misses_total)
hit_rate() { python3 -c "h,m=$1,$2; print(f'{h/(h+m):.4f} ({h} hits, {m} misses)' if h+m else 'n/a (no reads)')"; }
echo
echo "== read-through cache of remote"
echo "since start:     $(hit_rate "$hits" "$misses")"
echo "leaf-get rounds: $(hit_rate $((hits - hits0)) $((misses - misses0)))"
tier_stored=$(curl -sf --max-time 10 "http://127.0.0.1:${metrics[remote-tier]}/metrics" |
    awk '$1 ~ /^deriva_materialize_total\{/ && $1 ~ /result="stored"/ { s += $NF } END { printf "%.0f\n", s }')
echo "remote-tier materialize result=stored since start: $tier_stored"

echo
for name in remote remote-tier; do
echo "== mean backend call duration ($name, all workloads; calls, mean ms)"
curl -sf --max-time 10 "http://127.0.0.1:${metrics[$name]}/metrics" | python3 -c '
import re, sys
acc = {}
for line in sys.stdin:
    m = re.match(r"deriva_backend_request_duration_seconds_(sum|count)\{(.*)\} (\S+)$", line.strip())
    if not m:
        continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
    key = (labels.get("backend", "?"), labels.get("op", "?"))
    acc.setdefault(key, {})[m.group(1)] = float(m.group(3))
for (backend, op), v in sorted(acc.items()):
    n, total = v.get("count", 0), v.get("sum", 0)
    print(f"  {backend:<9} {op:<24} {n:>9.0f} {1000 * total / n if n else 0:>8.2f}")
'
done

echo
echo "== server logs (lines at WARN or above)"
for name in "${servers[@]}"; do
    echo "  $name: $(grep -c -E 'WARN|ERROR' "$work/$name.log" || true) lines"
    grep -E 'WARN|ERROR' "$work/$name.log" | head -n 3 | cut -c1-200 | sed 's/^/    /' || true
done

echo
echo "== all workloads (medians of $rounds rounds, $conc clients, ${secs}s per run)"
summary
