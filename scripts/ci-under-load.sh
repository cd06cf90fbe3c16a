#!/usr/bin/env bash
# Runs `.ci/run` N times (default 5), each on a fresh clone of HEAD with a fresh target
# directory, while both CPUs are kept busy by `stress-ng --cpu NCPU` (or, without stress-ng,
# one `yes > /dev/null` loop per CPU). The load is started before and stopped after each run,
# by pid. Prints each run's result and time, and keeps every log.
#
#   bash scripts/ci-under-load.sh [RUNS] [LOGDIR]
#
# Stops at the first failing run unless KEEP_GOING=1. Run as root, as CI does.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-5}
logs=${2:-$(mktemp -d /tmp/deriva-ci-under-load.XXXXXX)}
mkdir -p "$logs"
cpus=$(nproc)

load_pids=()
start_load() {
    if command -v stress-ng >/dev/null; then
        stress-ng --cpu "$cpus" --quiet &
        load_pids=($!)
    else
        load_pids=()
        for _ in $(seq "$cpus"); do
            yes >/dev/null &
            load_pids+=($!)
        done
    fi
}
stop_load() {
    [ "${#load_pids[@]}" -gt 0 ] || return 0
    kill "${load_pids[@]}" 2>/dev/null || true
    wait "${load_pids[@]}" 2>/dev/null || true
    load_pids=()
}
trap stop_load EXIT

echo "commit $(git -C "$repo" rev-parse --short HEAD); $runs runs; $cpus CPUs loaded by $(command -v stress-ng >/dev/null && echo stress-ng || echo yes); logs in $logs"
failed=0
for run in $(seq "$runs"); do
    clone=$(mktemp -d /tmp/deriva-ci-clone.XXXXXX)
    git clone -q "$repo" "$clone"
    start_load
    started=$(date +%s)
    if (cd "$clone" && bash .ci/run) >"$logs/run-$run.log" 2>&1; then
        result=passed
    else
        result=FAILED
        failed=$((failed + 1))
    fi
    took=$(($(date +%s) - started))
    stop_load
    echo "run $run: $result in ${took}s (load average $(cut -d' ' -f1-3 /proc/loadavg)); log $logs/run-$run.log"
    if [ "$result" = FAILED ]; then
        grep -E "^test .* FAILED$|panicked at|^error" "$logs/run-$run.log" | sed -n 1,20p || true
    fi
    rm -rf "$clone"
    if [ "$result" = FAILED ] && [ "${KEEP_GOING:-0}" != 1 ]; then
        break
    fi
done
[ "$failed" = 0 ]
