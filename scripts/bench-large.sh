#!/usr/bin/env bash
# A large leaf through Deriva: `deriva put FILE` (PutLeafStream, written to disk, fsynced and
# renamed into place) and `deriva get ADDR > /dev/null` (streamed from disk, hashed on the way),
# as ratios to the limits of this machine measured in the same run on the same file:
#
# - `b3sum --num-threads 1 FILE`: hashing it on one core (the server hashes a stream on one);
# - `cat FILE > /dev/null`: reading it (from the page cache once warm, as Deriva's reads are);
# - `dd if=FILE of=COPY bs=1M conv=fsync`: writing it durably, the limit of a put (which
#   fsyncs before it answers).
#
# Each round runs the four in a shuffled order; the script prints every run, then the median
# time and rate of each, the median of the per-round ratios tool / deriva (1.0: as fast as the
# tool), the server's CPU seconds per GiB for put and get (utime + stime from /proc/PID/stat),
# and its peak RSS (VmHWM, reset before each run with /proc/PID/clear_refs) per scenario.
#
# Usage: scripts/bench-large.sh [ROUNDS] [MIB]   (defaults: 5 1024)
# BENCH_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
mib=${2:-1024}
[ "$rounds" -ge 3 ] || { echo "at least 3 rounds" >&2; exit 2; }
readonly ready_secs=60

command -v b3sum >/dev/null || { apt-get install -y -q b3sum >/dev/null || { echo "needs b3sum (apt-get install b3sum)" >&2; exit 1; }; }
cargo build --release -q -p deriva-server -p deriva-cli --bins
bin=$PWD/target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-large
server_pid=
bench_stop() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}

file=$work/leaf.bin
head -c "$((mib << 20))" /dev/urandom >"$file"
port=$(free_port)
url=http://127.0.0.1:$port
"$bin/deriva-server" --data-dir "$work/data" --listen "127.0.0.1:$port" --metrics-port 0 \
    >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq $((ready_secs * 10))); do
    "$bin/deriva" --server "$url" status >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
done
"$bin/deriva" --server "$url" status >/dev/null
addr=$("$bin/deriva" --server "$url" put "$file")
[ "$addr" = "$(b3sum --no-names "$file")" ] || { echo "the address is not the file's BLAKE3" >&2; exit 1; }

reset_peak() { echo 5 >"/proc/$server_pid/clear_refs"; }
peak_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$server_pid/status"; }
now() { date +%s.%N; }

run() {
    local what=$1 start end ticks0 ticks1
    case $what in put | get) reset_peak; ticks0=$(cpu_ticks "$server_pid") ;; esac
    start=$(now)
    case $what in
        b3sum) b3sum --num-threads 1 "$file" >/dev/null ;;
        cat) cat "$file" >/dev/null ;;
        write) dd if="$file" of="$work/copy" bs=1M conv=fsync status=none; rm -f "$work/copy" ;;
        put) [ "$("$bin/deriva" --server "$url" put "$file")" = "$addr" ] ;;
        get) "$bin/deriva" --server "$url" get "$addr" >/dev/null ;;
    esac
    end=$(now)
    case $what in
        put | get) ticks1=$(cpu_ticks "$server_pid")
            echo "$what $(echo "$end - $start" | bc -l) $((ticks1 - ticks0)) $(peak_kib)" ;;
        *) echo "$what $(echo "$end - $start" | bc -l) 0 0" ;;
    esac
}

# A warm-up of every tool, so the first round reads the file from the same page cache.
for w in b3sum cat get; do run "$w" >/dev/null; done
: >"$work/runs"
for r in $(seq "$rounds"); do
    for w in $(printf '%s\n' b3sum cat write put get | shuf); do
        line=$(run "$w")
        echo "round $r: $line"
        echo "$r $line" >>"$work/runs"
    done
done

python3 - "$work/runs" "$mib" "$(getconf CLK_TCK)" <<'EOF'
import statistics, sys
from collections import defaultdict
runs, mib, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times, rounds, ticks, peaks = defaultdict(list), defaultdict(dict), defaultdict(list), defaultdict(list)
for line in open(runs):
    r, what, secs, tk, peak = line.split()
    times[what].append(float(secs)); rounds[r][what] = float(secs)
    ticks[what].append(int(tk)); peaks[what].append(int(peak))
gib = mib / 1024
print(f"\n{mib} MiB, {len(rounds)} rounds (medians)")
for what in ("b3sum", "cat", "write", "put", "get"):
    t = statistics.median(times[what])
    print(f"  {what:6} {t:7.3f} s  {mib / t:8.0f} MiB/s")
for deriva, tools in (("put", ("b3sum", "cat", "write")), ("get", ("b3sum", "cat"))):
    for tool in tools:
        ratio = statistics.median(v[tool] / v[deriva] for v in rounds.values())
        print(f"  {deriva} / {tool}: {ratio:.2f} of the tool's rate")
for deriva in ("put", "get"):
    cpu = statistics.median(ticks[deriva]) / hz / gib
    print(f"  {deriva}: server CPU {cpu:.2f} s per GiB, peak RSS {max(peaks[deriva]) // 1024} MiB")
EOF
