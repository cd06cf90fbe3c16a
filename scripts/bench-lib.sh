# shellcheck shell=bash
# What the bench-*.sh scripts share; sourced by them, never run alone.
#
# bench_begin NAME   makes the work directory $work (/tmp/deriva-NAME.XXXXXX) and installs the
#                    exit traps. On exit, the script's own `bench_stop` (if it defines one)
#                    stops what it started, by pid; then $work is removed, or kept and named
#                    when BENCH_KEEP is set or the run failed.
# free_port          prints a free TCP port on 127.0.0.1.
# cpu_ticks PID      prints utime + stime of PID, in clock ticks.
# alive PID          whether PID runs (a server that exited stays a zombie until waited for).
# backends_start     starts a SeaweedFS and a PostgreSQL (deriva-testkit/backends.sh) in
#                    $backends (set it first, under $work), reads their settings
#                    (DERIVA_TEST_*) and exports the AWS_* variables a server reads. The
#                    script's bench_stop stops them: deriva-testkit/backends.sh stop "$backends".
# backend_ticks DIR  prints the CPU ticks of the SeaweedFS and of the PostgreSQL that
#                    deriva-testkit/backends.sh started in DIR, on one line.
# bench_cpu_run PID URL WORKLOAD [FLAG...]
#                    runs one `$bin/deriva bench --json` of WORKLOAD against URL (with the
#                    FLAGs), reading the server PID's CPU time around it; prints
#                    "req/s<TAB>server CPU µs per request<TAB>errors<TAB>elapsed seconds".
#
# median_table RESULTS TITLE NAMES WORKLOADS
#                    prints, from RESULTS (lines "round<TAB>name<TAB>workload<TAB>" then
#                    bench_cpu_run's fields), the median throughput and CPU µs per request and
#                    the errors of each (name, workload); TITLE heads the first column, NAMES and
#                    WORKLOADS are space-separated lists.
# bench_ready NAME PID URL
#                    waits until the server PID answers a Status call at URL; gives up (exit 1,
#                    naming $work/NAME.log) after 30 s or when it has exited.
# ratio_table RESULTS NAMES WORKLOADS MODE
#                    prints, for each name of NAMES after the first (the base), the median over
#                    the rounds of its per-round ratio to the base, per workload, with the
#                    per-round ratios: MODE `cpu`, the CPU per request; `both`, the throughput
#                    and the CPU per request (the rounds' throughput ratios shown).
#
# A script that appends the pids it starts to the array `bench_pids` has them stopped (TERM,
# then waited for) on exit, after its own `bench_stop` if it defines one.

bench_pids=()

bench_begin() {
    bench_name=$1
    work=$(mktemp -d "/tmp/deriva-$bench_name.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_cleanup() {
    local status=$?
    trap - EXIT
    if declare -F bench_stop >/dev/null; then
        bench_stop || echo "$bench_name: stopping what it started failed" >&2
    fi
    if [ "${#bench_pids[@]}" -gt 0 ]; then
        kill "${bench_pids[@]}" 2>/dev/null || true
        wait "${bench_pids[@]}" 2>/dev/null || true
    fi
    if [ -n "${BENCH_KEEP:-}" ] || [ "$status" -ne 0 ]; then
        echo "$bench_name: logs and raw results kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Fields 14 and 15 of /proc/PID/stat, counted after the command name, which may hold spaces.
cpu_ticks() {
    local stat
    read -r stat <"/proc/$1/stat"
    stat=${stat##*) }
    local -a f
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

backends_start() {
    # The postgres user (backends.sh runs PostgreSQL as it when we are root) must reach
    # $backends/pg through $work.
    chmod o+x "$work"
    deriva-testkit/backends.sh start "$backends" >"$work/backends.out" 2>&1 ||
        { cat "$work/backends.out" >&2; exit 1; }
    # shellcheck disable=SC1091 # written by backends.sh
    . "$backends/env"
    export AWS_ENDPOINT_URL="$DERIVA_TEST_S3_ENDPOINT" AWS_REGION=us-east-1 \
        AWS_ACCESS_KEY_ID="$DERIVA_TEST_AWS_ACCESS_KEY_ID" \
        AWS_SECRET_ACCESS_KEY="$DERIVA_TEST_AWS_SECRET_ACCESS_KEY"
}

alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# utime + stime + cutime + cstime (fields 14 to 17) of the processes recorded in DIR/weed.pid
# and DIR/pg.pid and of every live process below them (the reaped children of PostgreSQL's
# postmaster show up in its cutime and cstime).
backend_ticks() {
    python3 - "$(cat "$1/weed.pid")" "$(cat "$1/pg.pid")" <<'PY'
import os, sys
stats = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            with open(f"/proc/{entry}/stat") as f:
                stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
        except OSError:
            pass
children = {}
for pid, f in stats.items():
    children.setdefault(int(f[1]), []).append(pid)
def ticks(root):
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += sum(int(x) for x in stats[pid][11:15])
            todo.extend(children.get(pid, []))
    return total
print(*(ticks(int(p)) for p in sys.argv[1:]))
PY
}

bench_cpu_run() {
    local pid=$1 url=$2 workload=$3 before after out
    shift 3
    before=$(cpu_ticks "$pid")
    out=$("${bin:?the script sets bin, the folder of the release binaries}/deriva" --server "$url" \
        bench --workload "$workload" --json "$@")
    after=$(cpu_ticks "$pid")
    python3 - "$(getconf CLK_TCK)" "$((after - before))" "$out" "$workload" <<'PY'
import json, sys
tck, ticks, out, workload = sys.argv[1:5]
r = json.loads(out)
n = r["requests"]
cpu = int(ticks) * 1e6 / int(tck) / n if n else float("nan")
if r["errors"]:
    print(f"{workload}: {r['errors']} errors; the first: {r['first_error']}", file=sys.stderr)
print(f"{r['throughput_rps']:.1f}\t{cpu:.2f}\t{r['errors']}\t{r['elapsed_secs']:.3f}")
PY
}

median_table() {
    python3 - "$@" <<'PY'
import statistics, sys
path, title, names, workloads = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
at = {(r[0], r[1], r[2]): (float(r[3]), float(r[4]), int(r[5])) for r in rows}
rounds = sorted({r[0] for r in rows}, key=int)
print(f"{title:<28} {'req/s':>9} {'cpu us/req':>10} {'errors':>7}")
for name in names:
    for w in workloads:
        rps = statistics.median(at[(k, name, w)][0] for k in rounds)
        cpu = statistics.median(at[(k, name, w)][1] for k in rounds)
        errors = sum(at[(k, name, w)][2] for k in rounds)
        print(f"{name + '/' + w:<28} {rps:>9.0f} {cpu:>10.1f} {errors:>7}")
PY
}

bench_ready() {
    local name=$1 pid=$2 url=$3
    for _ in $(seq 300); do
        alive "$pid" || { echo "$name exited; see $work/$name.log" >&2; exit 1; }
        "${bin:?}/deriva" --server "$url" status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$name is not answering after 30 s; see $work/$name.log" >&2
    exit 1
}

ratio_table() {
    python3 - "$@" <<'PY'
import statistics, sys
path, names, workloads, mode = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
at = {(r[0], r[1], r[2]): (float(r[3]), float(r[4]), int(r[5])) for r in rows}
rounds = sorted({r[0] for r in rows}, key=int)
base = names[0]
for name in names[1:]:
    print()
    if mode == "cpu":
        print(f"CPU per request, {name} / {base} (median of per-round ratios; below 1 is cheaper)")
    else:
        print(f"{name} / {base} (medians of per-round ratios): throughput, CPU per request")
    for w in workloads:
        tput = [at[(k, name, w)][0] / at[(k, base, w)][0] for k in rounds]
        cpu = [at[(k, name, w)][1] / at[(k, base, w)][1] for k in rounds]
        if mode == "cpu":
            spread = " ".join(f"{r:.2f}" for r in cpu)
            print(f"  {w:<14} {statistics.median(cpu):>6.3f}   rounds: {spread}")
        else:
            spread = " ".join(f"{r:.2f}" for r in tput)
            print(f"  {w:<14} {statistics.median(tput):>6.2f} {statistics.median(cpu):>6.2f}"
                  f"   rounds: {spread}")
PY
}
