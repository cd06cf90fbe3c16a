#!/usr/bin/env bash
# Two or more `deriva-server` binaries side by side (two commits, or one commit built with two
# release profiles): each started with its default flags (RUST_LOG unset, no metrics listener)
# on a free port and a data directory of its own, then driven in turn by one `deriva bench`
# client, (binary, workload) pairs in a freshly shuffled order each round. The server's CPU time
# (utime + stime from /proc/PID/stat) is read around each run and divided by the requests it
# served.
#
# Prints, per (binary, workload), the median throughput and CPU µs per request; then, for every
# binary after the first, the median over the rounds of its per-round CPU-per-request ratio
# against the first binary (below 1: cheaper than the first).
#
# Usage: scripts/bench-binaries.sh ROUNDS SECONDS CONCURRENCY LABEL=SERVER_BINARY...
#   e.g. scripts/bench-binaries.sh 5 3 16 before=/tmp/old/deriva-server after=target/release/deriva-server
# The client is target/release/deriva (built here), or $DERIVA_BENCH_CLIENT. Workloads default
# to "status cached-get leaf-get compute-get put-leaf"; set WORKLOADS to choose others.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -ge 5 ] || { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
rounds=$1
secs=$2
conc=$3
shift 3
[ "$rounds" -ge 1 ] || { echo "at least 1 round" >&2; exit 2; }
read -r -a workloads <<<"${WORKLOADS:-status cached-get leaf-get compute-get put-leaf}"

if [ -n "${DERIVA_BENCH_CLIENT:-}" ]; then
    bin=$(dirname "$DERIVA_BENCH_CLIENT")
else
    cargo build --release -q -p deriva-cli --bin deriva
    bin=target/release
fi
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-binaries

declare -A url pid
labels=()
for spec in "$@"; do
    label=${spec%%=*}
    server=${spec#*=}
    [ "$label" != "$spec" ] && [ -x "$server" ] || { echo "not LABEL=EXECUTABLE: $spec" >&2; exit 2; }
    [ -z "${pid[$label]:-}" ] || { echo "label $label given twice" >&2; exit 2; }
    labels+=("$label")
    port=$(free_port)
    url[$label]="http://127.0.0.1:$port"
    env -u RUST_LOG "$server" --listen "127.0.0.1:$port" --data-dir "$work/$label" \
        --metrics-port 0 2> "$work/$label.log" &
    pid[$label]=$!
    bench_pids+=($!)
done

# Ready once it answers a Status call.
for label in "${labels[@]}"; do
    bench_ready "$label" "${pid[$label]}" "${url[$label]}"
done

results=$work/results.tsv
: > "$results"
pairs=()
for label in "${labels[@]}"; do
    for w in "${workloads[@]}"; do pairs+=("$label/$w"); done
done
echo "rounds=$rounds duration=${secs}s concurrency=$conc cores=$(nproc) binaries=${labels[*]}"
for round in $(seq "$rounds"); do
    for pair in $(printf '%s\n' "${pairs[@]}" | shuf); do
        label=${pair%%/*}
        w=${pair#*/}
        measured=$(bench_cpu_run "${pid[$label]}" "${url[$label]}" "$w" --size 1KiB \
            --duration "${secs}s" --concurrency "$conc")
        printf '%s\t%s\t%s\t%s\n' "$round" "$label" "$w" "$measured" >> "$results"
    done
done
median_table "$results" binary/workload "${labels[*]}" "${workloads[*]}"
ratio_table "$results" "${labels[*]}" "${workloads[*]}" cpu
