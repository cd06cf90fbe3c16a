#!/usr/bin/env bash
# Telemetry overhead, measured side by side: two release servers on free ports, one with
# telemetry off (no metrics listener, no OTLP, RUST_LOG=off) and one with telemetry full
# (metrics listener, 100% sampling, OTLP export to a local receiver, JSON logs at info), driven
# alternately (A B A B ...) by `deriva bench`. Prints the median throughput of each and the
# ratio full/off for cached-get and compute-get.
#
# Usage: scripts/bench-overhead.sh [ROUNDS] [SECONDS] [CONCURRENCY]   (defaults: 5 5 16)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
secs=${2:-5}
conc=${3:-16}
[ "$rounds" -ge 3 ] || { echo "at least 3 rounds" >&2; exit 2; }

cargo build --release -q -p deriva-server -p deriva-cli --bins --example otlp-sink
bin=target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-overhead
pids=()
bench_stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

"$bin/examples/otlp-sink" > "$work/sink.out" 2> "$work/sink.err" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/sink.out" ] && break; sleep 0.1; done
endpoint=$(head -n1 "$work/sink.out")

off_port=$(free_port)
full_port=$(free_port)
metrics_port=$(free_port)
RUST_LOG=off "$bin/deriva-server" --listen "127.0.0.1:$off_port" --metrics-port 0 \
    --data-dir "$work/off" 2> "$work/off.log" &
pids+=($!)
RUST_LOG=info "$bin/deriva-server" --listen "127.0.0.1:$full_port" --metrics-port "$metrics_port" \
    --trace-sample-ratio 1.0 --otlp-endpoint "$endpoint" --log-format json \
    --data-dir "$work/full" 2> "$work/full.log" &
pids+=($!)
for port in "$off_port" "$full_port"; do
    for _ in $(seq 100); do
        "$bin/deriva" --server "http://127.0.0.1:$port" status >/dev/null 2>&1 && break
        sleep 0.1
    done
done

throughput() { # SERVER_PORT WORKLOAD
    "$bin/deriva" --server "http://127.0.0.1:$1" bench --workload "$2" --duration "${secs}s" \
        --concurrency "$conc" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["throughput_rps"])'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "rounds=$rounds duration=${secs}s concurrency=$conc cores=$(nproc)"
printf '%-12s %12s %12s %8s\n' workload off_rps full_rps full/off
for workload in cached-get compute-get; do
    : > "$work/off.$workload"
    : > "$work/full.$workload"
    for round in $(seq "$rounds"); do
        # Alternate which goes first, so drift in the machine's load hits both alike.
        if [ $((round % 2)) -eq 1 ]; then order="off full"; else order="full off"; fi
        for which in $order; do
            port=$off_port; [ "$which" = full ] && port=$full_port
            throughput "$port" "$workload" >> "$work/$which.$workload"
        done
    done
    off=$(median < "$work/off.$workload")
    full=$(median < "$work/full.$workload")
    ratio=$(python3 -c "print(f'{$full/$off:.3f}')")
    printf '%-12s %12.0f %12.0f %8s\n' "$workload" "$off" "$full" "$ratio"
    echo "  off:  $(tr '\n' ' ' < "$work/off.$workload")" >&2
    echo "  full: $(tr '\n' ' ' < "$work/full.$workload")" >&2
done
echo "full server log lines: $(wc -l < "$work/full.log"); sink: $(tail -n1 "$work/sink.err" 2>/dev/null)" >&2
