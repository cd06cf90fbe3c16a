#!/usr/bin/env bash
# Deriva's per-RPC cost against the transport floor (issues 20 and 34): the `transport-floor`
# example (a tonic server of the same proto, with no layers and fixed answers) and one release
# `deriva-server` with telemetry as the README's production advice sets it (the metrics
# listener, --trace-sample-ratio 0.1 (SAMPLE_RATIO overrides it), JSON logs at info, OTLP to
# examples/otlp-sink; set DERIVA_DEFAULTS=1 for its default flags instead: every request
# traced, no listener, no OTLP),
# on free ports, driven in turn by `deriva bench` in a shuffled order each round:
#   floor/status  floor/cached-get  deriva/status  deriva/cached-get  deriva/leaf-get  deriva/put-leaf
# The server's CPU time (utime + stime from /proc/PID/stat) is read around each run and divided
# by the requests it served. Prints, per pair, the median throughput and CPU µs per request,
# then the budgets of issue 34, each a median of per-round ratios:
#   deriva Status CPU/req ÷ floor Status CPU/req         ≤ 1.25
#   deriva cached-get CPU/req ÷ floor Status CPU/req     ≤ 1.50
#   deriva leaf-get req/s ÷ deriva cached-get req/s      ≥ 0.95
#   deriva put-leaf req/s ÷ deriva Status req/s          ≥ 0.45
# Values are 1 KiB (the floor's Get chunk and the bench's --size).
#
# Usage: scripts/bench-floor.sh [ROUNDS] [SECONDS] [CONCURRENCY]   (defaults: 5 3 16)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
secs=${2:-3}
conc=${3:-16}
size=1KiB
[ "$rounds" -ge 1 ] || { echo "at least 1 round" >&2; exit 2; }

cargo build --release -q -p deriva-server -p deriva-cli --bins --example transport-floor \
    --example otlp-sink
bin=target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-floor

declare -A url pid
# The floor picks its own port and prints its endpoint first.
"$bin/examples/transport-floor" --size "$size" > "$work/floor.out" 2> "$work/floor.log" &
pid[floor]=$!
bench_pids+=($!)
port=$(free_port)
url[deriva]="http://127.0.0.1:$port"
if [ "${DERIVA_DEFAULTS:-0}" = 1 ]; then
    env -u RUST_LOG "$bin/deriva-server" --listen "127.0.0.1:$port" --data-dir "$work/deriva" \
        --metrics-port 0 2> "$work/deriva.log" &
else
    "$bin/examples/otlp-sink" > "$work/sink.out" 2> "$work/sink.err" &
    bench_pids+=($!)
    for _ in $(seq 100); do [ -s "$work/sink.out" ] && break; sleep 0.1; done
    endpoint=$(head -n1 "$work/sink.out")
    [ -n "$endpoint" ] || { echo "the OTLP receiver did not start; see $work/sink.err" >&2; exit 1; }
    RUST_LOG=info "$bin/deriva-server" --listen "127.0.0.1:$port" --data-dir "$work/deriva" \
        --metrics-addr "127.0.0.1:$(free_port)" --trace-sample-ratio "${SAMPLE_RATIO:-0.1}" \
        --log-format json --otlp-endpoint "$endpoint" > /dev/null 2> "$work/deriva.log" &
fi
pid[deriva]=$!
bench_pids+=($!)

# Ready once it answers a Status call (both do); gives up after 30 s or when it has exited.
wait_ready() { # NAME
    local name=$1
    for _ in $(seq 300); do
        kill -0 "${pid[$name]}" 2>/dev/null || { echo "$name exited; see $work/$name.log" >&2; return 1; }
        if [ "$name" = floor ] && [ -z "${url[floor]:-}" ]; then
            url[floor]=$(head -n1 "$work/floor.out")
        fi
        if [ -n "${url[$name]:-}" ] &&
            "$bin/deriva" --server "${url[$name]}" status >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "$name is not answering after 30 s; see $work/$name.log" >&2
    return 1
}
wait_ready floor
wait_ready deriva

results=$work/results.tsv
: > "$results"
run_one() { # ROUND SERVER WORKLOAD
    local measured
    measured=$(bench_cpu_run "${pid[$2]}" "${url[$2]}" "$3" --size "$size" \
        --duration "${secs}s" --concurrency "$conc")
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$measured" >> "$results"
}

pairs=(floor/status floor/cached-get deriva/status deriva/cached-get deriva/leaf-get deriva/put-leaf)
echo "rounds=$rounds duration=${secs}s concurrency=$conc size=$size cores=$(nproc)"
for round in $(seq "$rounds"); do
    # A fresh shuffled order each round, so drift in the machine's load hits all alike.
    for pair in $(printf '%s\n' "${pairs[@]}" | shuf); do
        run_one "$round" "${pair%%/*}" "${pair#*/}"
    done
done
python3 - "$results" "${pairs[@]}" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
pairs = sys.argv[2:]
# (round, pair) -> (req/s, cpu µs/req)
at = {(r[0], f"{r[1]}/{r[2]}"): (float(r[3]), float(r[4])) for r in rows}
errors = {p: sum(int(r[5]) for r in rows if f"{r[1]}/{r[2]}" == p) for p in pairs}
rounds = sorted({r[0] for r in rows}, key=int)
print(f"{'server/workload':<18} {'req/s':>9} {'cpu us/req':>10} {'errors':>7}")
for p in pairs:
    rps = statistics.median(at[(k, p)][0] for k in rounds)
    cpu = statistics.median(at[(k, p)][1] for k in rounds)
    print(f"{p:<18} {rps:>9.0f} {cpu:>10.1f} {errors[p]:>7}")
    per_round = " ".join(f"{at[(k, p)][0]:.0f}/{at[(k, p)][1]:.1f}" for k in rounds)
    print(f"  {p} (req/s/cpu us per round): {per_round}", file=sys.stderr)
RPS, CPU = 0, 1
budgets = [
    # what, numerator, denominator, measure, budget, the ratio must be at most (else at least)
    ("deriva Status CPU/req / floor Status CPU/req", "deriva/status", "floor/status", CPU, 1.25, True),
    ("deriva cached-get CPU/req / floor Status CPU/req", "deriva/cached-get", "floor/status", CPU, 1.50, True),
    ("deriva leaf-get req/s / deriva cached-get req/s", "deriva/leaf-get", "deriva/cached-get", RPS, 0.95, False),
    ("deriva put-leaf req/s / deriva Status req/s", "deriva/put-leaf", "deriva/status", RPS, 0.45, False),
]
print()
print(f"{'ratio (median of per-round ratios)':<50} {'value':>6} {'budget':>8}")
for what, num, den, m, budget, at_most in budgets:
    ratio = statistics.median(at[(k, num)][m] / at[(k, den)][m] for k in rounds)
    ok = ratio <= budget if at_most else ratio >= budget
    sign = "<=" if at_most else ">="
    print(f"{what:<50} {ratio:>6.3f} {sign} {budget:<5.2f} {'PASS' if ok else 'over'}")
PY
