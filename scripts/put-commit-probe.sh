#!/usr/bin/env bash
# What a durable PutLeaf commit does: a release server (production telemetry without OTLP)
# under `deriva bench -w put-leaf -c 16` for 3 s, with `strace -c` counting its fdatasync and
# pwrite64 calls and /metrics its commits (deriva_storage_leaf_commits_total). strace slows the
# server: the throughput printed is not a benchmark figure, the calls per commit are.
#
# Usage: scripts/put-commit-probe.sh   (needs strace and curl; builds the release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p deriva-server -p deriva-cli --bins
bin=target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin put-commit-probe
grpc=$(free_port)
metrics=$(free_port)
RUST_LOG=warn "$bin/deriva-server" --listen "127.0.0.1:$grpc" --data-dir "$work/data" \
    --metrics-addr "127.0.0.1:$metrics" --trace-sample-ratio 0.1 2> "$work/server.log" &
server=$!
bench_pids+=("$server")
for _ in $(seq 300); do
    "$bin/deriva" --server "http://127.0.0.1:$grpc" status > /dev/null 2>&1 && break
    sleep 0.1
done
commits() { curl -s "127.0.0.1:$metrics/metrics" | awk '/^deriva_storage_leaf_commits_total/ {print $2}'; }
before=$(commits)
strace -f -c -e trace=fdatasync,fsync,pwrite64,pwritev,write -o "$work/strace.out" -p "$server" 2> /dev/null &
tracer=$!
sleep 0.5
"$bin/deriva" --server "http://127.0.0.1:$grpc" bench -w put-leaf --size 1KiB -d 3s -c 16 |
    grep -E 'requests|throughput'
kill -INT "$tracer"
wait "$tracer" || true
after=$(commits)
echo "durable commits: $((after - before))"
grep -E 'calls|fdatasync|pwrite64|pwritev|write' "$work/strace.out"
