# shellcheck shell=bash
# What the bench-*.sh scripts share; sourced by them, never run alone.
#
# bench_begin NAME   makes the work directory $work (/tmp/deriva-NAME.XXXXXX) and installs the
#                    exit traps. On exit, the script's own `bench_stop` (if it defines one)
#                    stops what it started, by pid; then $work is removed, or kept and named
#                    when BENCH_KEEP is set or the run failed.
# free_port          prints a free TCP port on 127.0.0.1.
# cpu_ticks PID      prints utime + stime of PID, in clock ticks.

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
