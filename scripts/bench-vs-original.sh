#!/usr/bin/env bash
# This project against the original Deriva (GitHub mehmet-ylcnky/Deriva), side by side, on the
# original's own workloads: one `deriva bench` client (ours, release) drives each server in
# turn, (server, workload) pairs in a freshly shuffled order each round; the server's CPU time
# (utime + stime from /proc/PID/stat) is read around each run and divided by the requests it
# served. Servers:
#   original    the original's deriva-server (--listen-addr, --metrics-port 0), RUST_LOG=warn;
#   ours        ours as the README's production advice runs it: the metrics listener,
#               --trace-sample-ratio 0.1, JSON logs at info, OTLP (spans, metrics, log
#               records) to a local receiver (examples/otlp-sink, which keeps nothing);
#   ours-quiet  ours as the original runs: RUST_LOG=warn, no metrics listener, no OTLP.
# Workloads (--concurrency CONCURRENCY, --duration SECONDS each):
#   status, cached-get of 1 KiB and of 1 MiB (identity over a leaf, fetched once: the
#   original's builtins are version 1.0.0, ours v1), put-leaf of 1 KiB (ours durable, the
#   original not).
# Prints, per (server, workload), the median throughput and CPU µs per request; then, for ours
# and ours-quiet, the medians over the rounds of the per-round ratios to the original
# (throughput above 1: faster; CPU below 1: cheaper).
#
# Usage: scripts/bench-vs-original.sh ORIGINAL_BIN_DIR [ROUNDS] [SECONDS] [CONCURRENCY]
#   (defaults: 5 rounds, 3 s, 16 clients). Build the original first: in a clone of it,
#   `cargo build --release -p deriva-server` (needs protoc: apt install protobuf-compiler);
#   ORIGINAL_BIN_DIR is then its target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -ge 1 ] || { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
original=$1/deriva-server
rounds=${2:-5}
secs=${3:-3}
conc=${4:-16}
[ -x "$original" ] || { echo "no executable $original" >&2; exit 2; }
[ "$rounds" -ge 1 ] || { echo "at least 1 round" >&2; exit 2; }

cargo build --release -q -p deriva-server -p deriva-cli --bins --example otlp-sink
bin=target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-vs-original

"$bin/examples/otlp-sink" > "$work/sink.out" 2> "$work/sink.err" &
bench_pids+=($!)
for _ in $(seq 100); do [ -s "$work/sink.out" ] && break; sleep 0.1; done
endpoint=$(head -n1 "$work/sink.out")
[ -n "$endpoint" ] || { echo "the OTLP receiver did not start; see $work/sink.err" >&2; exit 1; }

servers=(original ours ours-quiet)
declare -A url pid function
port=$(free_port)
url[original]="http://127.0.0.1:$port"
function[original]=identity/1.0.0
RUST_LOG=warn "$original" --listen-addr "127.0.0.1:$port" --data-dir "$work/original" \
    --metrics-port 0 2> "$work/original.log" &
pid[original]=$!
bench_pids+=($!)

port=$(free_port)
url[ours]="http://127.0.0.1:$port"
function[ours]=identity/v1
RUST_LOG=info "$bin/deriva-server" --listen "127.0.0.1:$port" --data-dir "$work/ours" \
    --metrics-addr "127.0.0.1:$(free_port)" --trace-sample-ratio 0.1 --log-format json \
    --otlp-endpoint "$endpoint" 2> "$work/ours.log" &
pid[ours]=$!
bench_pids+=($!)

port=$(free_port)
url[ours-quiet]="http://127.0.0.1:$port"
function[ours-quiet]=identity/v1
RUST_LOG=warn "$bin/deriva-server" --listen "127.0.0.1:$port" --data-dir "$work/ours-quiet" \
    --metrics-port 0 2> "$work/ours-quiet.log" &
pid[ours-quiet]=$!
bench_pids+=($!)

# Ready once it answers a Status call.
for s in "${servers[@]}"; do
    bench_ready "$s" "${pid[$s]}" "${url[$s]}"
done

# workload name -> `deriva bench` flags
declare -A flags=(
    [status]="--workload status"
    [cached-get-1k]="--workload cached-get --size 1KiB"
    [cached-get-1m]="--workload cached-get --size 1MiB"
    [put-leaf-1k]="--workload put-leaf --size 1KiB"
)
workloads=(status cached-get-1k cached-get-1m put-leaf-1k)
results=$work/results.tsv
: > "$results"
pairs=()
for s in "${servers[@]}"; do
    for w in "${workloads[@]}"; do pairs+=("$s/$w"); done
done
echo "original=$(git -C "$1/../.." rev-parse --short HEAD 2>/dev/null || echo unknown) ours=$(git rev-parse --short HEAD)"
echo "rounds=$rounds duration=${secs}s concurrency=$conc cores=$(nproc)"
for round in $(seq "$rounds"); do
    for pair in $(printf '%s\n' "${pairs[@]}" | shuf); do
        s=${pair%%/*}
        w=${pair#*/}
        read -r -a extra <<<"${flags[$w]}"
        # bench_cpu_run takes the workload as its third argument.
        measured=$(bench_cpu_run "${pid[$s]}" "${url[$s]}" "${extra[1]}" "${extra[@]:2}" \
            --function "${function[$s]}" --duration "${secs}s" --concurrency "$conc")
        printf '%s\t%s\t%s\t%s\n' "$round" "$s" "$w" "$measured" >> "$results"
    done
done
median_table "$results" server/workload "${servers[*]}" "${workloads[*]}"
ratio_table "$results" "${servers[*]}" "${workloads[*]}" both
