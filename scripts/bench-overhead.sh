#!/usr/bin/env bash
# Telemetry overhead, measured side by side: four release servers on free ports, driven in
# turn by `deriva bench`, in a shuffled order each round:
#   off        no metrics listener, no OTLP, RUST_LOG=off, --trace-sample-ratio 0 (nothing traced
#              but the trace store's 10 a second and the failed or slow requests);
#   full       metrics listener, 100% sampling, OTLP export (spans, metrics and log records) to a
#              local receiver, JSON logs at info (failed calls only: a served call logs at DEBUG);
#   full-logs  full, with deriva_server at DEBUG: one log line and one OTLP log record per call
#              (the "rpc finished" access line), to price a log record;
#   sampled    full at --trace-sample-ratio 0.1, the setting BENCHMARKS.md recommends.
# Prints, per workload, the median throughput and the median server CPU time per request
# (utime + stime from /proc/PID/stat around each run, over the requests it served) of each,
# and their ratios to `off`.
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

"$bin/examples/otlp-sink" > "$work/sink.out" 2> "$work/sink.err" &
bench_pids+=($!)
for _ in $(seq 100); do [ -s "$work/sink.out" ] && break; sleep 0.1; done
endpoint=$(head -n1 "$work/sink.out")

configs=(off full full-logs sampled)
declare -A port pid
start_server() { # NAME RUST_LOG ARGS...
    local name=$1 log=$2
    shift 2
    port[$name]=$(free_port)
    RUST_LOG=$log "$bin/deriva-server" --listen "127.0.0.1:${port[$name]}" \
        --data-dir "$work/$name" "$@" 2> "$work/$name.log" &
    pid[$name]=$!
    bench_pids+=($!)
}
start_server off off --metrics-port 0 --trace-sample-ratio 0
full_flags=(--trace-sample-ratio 1.0 --otlp-endpoint "$endpoint" --log-format json)
declare -A mport
mport[full]=$(free_port)
mport[full-logs]=$(free_port)
mport[sampled]=$(free_port)
start_server full info --metrics-port "${mport[full]}" "${full_flags[@]}"
start_server full-logs info,deriva_server=debug --metrics-port "${mport[full-logs]}" "${full_flags[@]}"
start_server sampled info --metrics-port "${mport[sampled]}" \
    --trace-sample-ratio 0.1 --otlp-endpoint "$endpoint" --log-format json
for name in "${configs[@]}"; do
    for _ in $(seq 100); do
        "$bin/deriva" --server "http://127.0.0.1:${port[$name]}" status >/dev/null 2>&1 && break
        sleep 0.1
    done
done

results=$work/results.tsv
: > "$results"
# The span export counters of a server with a metrics listener: "exported dropped", or "0 0".
span_counts() { # NAME
    [ -n "${mport[$1]:-}" ] || { echo "0 0"; return; }
    curl -s "http://127.0.0.1:${mport[$1]}/metrics" | awk '
        /^deriva_telemetry_spans_exported_total / { e = $2 }
        /^deriva_telemetry_spans_dropped_total / { d = $2 }
        END { printf "%d %d\n", e, d }'
}
run_one() { # WORKLOAD NAME
    local spans_before spans_after rps cpu elapsed
    spans_before=$(span_counts "$2")
    IFS=$'\t' read -r rps cpu _ elapsed < <(bench_cpu_run "${pid[$2]}" \
        "http://127.0.0.1:${port[$2]}" "$1" --duration "${secs}s" --concurrency "$conc")
    spans_after=$(span_counts "$2")
    awk -v w="$1" -v n="$2" -v rps="$rps" -v cpu="$cpu" -v secs="$elapsed" \
        -v s0="$spans_before" -v s1="$spans_after" 'BEGIN {
            split(s0, a, " "); split(s1, b, " ")
            printf "%s\t%s\t%s\t%s\t%.0f\t%.0f\n", w, n, rps, cpu, (b[1] - a[1]) / secs, (b[2] - a[2]) / secs
        }' >> "$results"
}

echo "rounds=$rounds duration=${secs}s concurrency=$conc cores=$(nproc)"
for workload in cached-get compute-get; do
    for _ in $(seq "$rounds"); do
        # A fresh shuffled order each round, so drift in the machine's load hits all alike.
        for name in $(printf '%s\n' "${configs[@]}" | shuf); do
            run_one "$workload" "$name"
        done
    done
done
python3 - "$results" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
configs = ["off", "full", "full-logs", "sampled"]
print(f"{'workload':<12} {'config':<10} {'req/s':>9} {'cpu us/req':>10} {'rps/off':>8} {'cpu/off':>8}")
for workload in dict.fromkeys(r[0] for r in rows):
    med = {}
    for c in configs:
        mine = [r for r in rows if r[0] == workload and r[1] == c]
        med[c] = (statistics.median(float(r[2]) for r in mine),
                  statistics.median(float(r[3]) for r in mine))
    for c in configs:
        rps, cpu = med[c]
        print(f"{workload:<12} {c:<10} {rps:>9.0f} {cpu:>10.1f} {rps / med['off'][0]:>8.3f} {cpu / med['off'][1]:>8.3f}")
    for c in configs[1:]:
        mine = [r for r in rows if r[0] == workload and r[1] == c]
        exported = statistics.median(float(r[4]) for r in mine)
        dropped = statistics.median(float(r[5]) for r in mine)
        print(f"{workload:<12} {c:<10} spans exported {exported:>8.0f}/s, dropped at the full queue {dropped:>8.0f}/s")
    for c in configs:
        per_round = [f"{float(r[2]):.0f}/{float(r[3]):.1f}" for r in rows if r[0] == workload and r[1] == c]
        print(f"  {c} (req/s/cpu us per round): {' '.join(per_round)}", file=sys.stderr)
PY
for name in full full-logs sampled; do
    echo "$name server log lines: $(wc -l < "$work/$name.log")" >&2
done
echo "sink: $(tail -n1 "$work/sink.err" 2>/dev/null)" >&2
