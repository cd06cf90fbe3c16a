#!/usr/bin/env bash
# How fast `deriva-server migrate` moves a local store to the remote backend, as a ratio to a
# plain copy of the same bytes into the same bucket.
#
# Two source stores are filled by a release server and `deriva bench --workload put-leaf`:
# SMALL leaves of 1 KiB and LARGE leaves of 32 MiB (above the multipart threshold). Then, for
# each store and each round, in a shuffled order:
#
# - migrate: `deriva-server migrate` from the local store to a fresh prefix and schema of the
#   SeaweedFS + PostgreSQL from deriva-testkit/backends.sh (default flags: 8 at once);
# - plain:   `plain_copy` (deriva-store-remote/examples/plain_copy.rs), which PUTs every blob file
#   of the store to a fresh prefix of the same bucket, 8 at once, with no hashing, no index
#   and no checks.
#
# Each tool reports its own duration (from its start of work to the end of the last write,
# listing included); the rates are bytes / duration and objects / duration. The peak RSS of
# each migrate run (its ru_maxrss, from a Python wrapper) shows its memory bound. Prints every
# run, then per store the medians and the median of the per-round ratios migrate / plain.
#
# Usage: scripts/bench-migrate.sh [ROUNDS] [SMALL] [LARGE]   (defaults: 5 4000 8)
# BENCH_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
small=${2:-4000}
large=${3:-8}
[ "$rounds" -ge 3 ] || { echo "at least 3 rounds" >&2; exit 2; }
readonly ready_secs=60

cargo build --release -q -p deriva-server -p deriva-cli --bins
cargo build --release -q -p deriva-store-remote --example plain_copy
bin=$PWD/target/release
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_begin bench-migrate
backends=$work/backends
server_pid=
bench_stop() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    deriva-testkit/backends.sh stop "$backends" >/dev/null
}

backends_start

# fill NAME COUNT SIZE: a local store in $work/NAME with COUNT fresh leaves of SIZE, every one a
# file under blobs/ (--inline-leaf-bytes 0), the files plain_copy copies: by default small
# leaves are rows of leaves.redb, which plain_copy would not see.
fill() {
    local name=$1 count=$2 size=$3 port deadline
    port=$(free_port)
    RUST_LOG=warn "$bin/deriva-server" --listen "127.0.0.1:$port" --metrics-port 0 \
        --data-dir "$work/$name" --inline-leaf-bytes 0 2>"$work/$name.log" &
    server_pid=$!
    deadline=$((SECONDS + ready_secs))
    until "$bin/deriva" --server "http://127.0.0.1:$port" status >/dev/null 2>&1; do
        if ! kill -0 "$server_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "bench-migrate: the filling server did not become ready" >&2
            tail -n 20 "$work/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    "$bin/deriva" --server "http://127.0.0.1:$port" bench --workload put-leaf \
        --requests "$count" --size "$size" --concurrency 8 --json >"$work/$name.fill.json"
    kill "$server_pid"
    wait "$server_pid" || true
    server_pid=
}
fill small "$small" 1KiB
fill large "$large" 32MiB

# The peak RSS (KiB) of a command, written to the file $1; runs the command in $2...
cat >"$work/rss.py" <<'PY'
import resource, subprocess, sys
done = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE)
with open(sys.argv[1], "w") as f:
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=f)
sys.stdout.buffer.write(done.stdout)
sys.exit(done.returncode)
PY

results=$work/results.tsv
printf 'store\ttool\tround\tobjects\tbytes\tseconds\trss_kib\n' >"$results"

# run_one STORE TOOL ROUND: one copy of $work/STORE to a fresh place; appends to $results.
run_one() {
    local store=$1 tool=$2 round=$3 out
    case $tool in
    migrate)
        out=$(python3 "$work/rss.py" "$work/rss" "$bin/deriva-server" migrate --data-dir "$work/$store" \
            --to-blob-store "s3://$DERIVA_TEST_S3_BUCKET/bench-migrate/$store-$round" \
            --to-index "$DERIVA_TEST_PG_URL" --to-index-schema "bench_migrate_${store}_$round" \
            --json)
        python3 -c '
import json, sys
r = json.loads(sys.argv[1])
print(r["leaves"]["copied"], r["bytes"], r["duration_seconds"])' "$out"
        ;;
    plain)
        "$bin/examples/plain_copy" "$work/$store/blobs" "$DERIVA_TEST_S3_BUCKET" \
            "bench-plain/$store-$round" 8
        ;;
    esac | { read -r objects bytes seconds
        rss=-
        [ "$tool" != migrate ] || rss=$(cat "$work/rss")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$store" "$tool" "$round" "$objects" "$bytes" "$seconds" "$rss"; } >>"$results"
    tail -n 1 "$results"
}

echo "rounds=$rounds small=$small x 1KiB large=$large x 32MiB cores=$(nproc)"
for store in small large; do
    for round in $(seq "$rounds"); do
        for tool in $(shuf -e migrate plain); do
            run_one "$store" "$tool" "$round"
        done
    done
done

python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print()
print(f"{'store':<6} {'tool':<8} {'objects':>8} {'MiB':>8} {'s (median)':>11} {'obj/s':>9} {'MiB/s':>8}")
for store in ("small", "large"):
    per = {}
    for tool in ("migrate", "plain"):
        rs = [r for r in rows if r["store"] == store and r["tool"] == tool]
        secs = statistics.median(float(r["seconds"]) for r in rs)
        objects, nbytes = int(rs[0]["objects"]), int(rs[0]["bytes"])
        for r in rs:
            assert int(r["objects"]) == objects and int(r["bytes"]) == nbytes, f"{store}/{tool}: runs copied different amounts"
        per[tool] = {int(r["round"]): float(r["seconds"]) for r in rs}
        print(f"{store:<6} {tool:<8} {objects:>8} {nbytes / 2**20:>8.1f} {secs:>11.3f} "
              f"{objects / secs:>9.0f} {nbytes / 2**20 / secs:>8.1f}")
    rss = [int(r["rss_kib"]) for r in rows if r["store"] == store and r["tool"] == "migrate"]
    print(f"{store:<6} migrate peak RSS: max {max(rss) / 1024:.0f} MiB, median {statistics.median(rss) / 1024:.0f} MiB")
    ratios = [per["plain"][k] / per["migrate"][k] for k in per["migrate"]]
    print(f"{store:<6} rate migrate / plain: median {statistics.median(ratios):.2f} "
          f"(rounds: {' '.join(f'{x:.2f}' for x in ratios)})")
PY
