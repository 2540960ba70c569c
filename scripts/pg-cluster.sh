#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests and CI (Debian's postgresql package; never for real data:
# trust authentication, fsync off).
#
#   pg-cluster.sh start DIR   creates the cluster in DIR (a new or empty directory) on a free port of
#                             127.0.0.1 with a database "p11shim", starts it and prints its URL
#                             postgres://postgres@127.0.0.1:PORT/p11shim (the only line on stdout);
#                             on a DIR it created before, starts the server again on the same port
#   pg-cluster.sh pause DIR   stops the server, keeps DIR (for tests of a server that goes away)
#   pg-cluster.sh stop DIR    stops the server and removes DIR
#   pg-cluster.sh kill DIR    stops the server at once, as a crash would (-m immediate), keeps DIR
#   pg-cluster.sh start-standby PRIMARY_DIR DIR
#                             makes DIR a streaming standby of the running cluster in PRIMARY_DIR
#                             (pg_basebackup -R) on a free port of 127.0.0.1, starts it, makes the primary
#                             replicate to it synchronously (a commit returns once the standby has its WAL)
#                             and prints the standby's URL; start, pause, kill and stop work on DIR as on any
#                             cluster
#   pg-cluster.sh promote DIR makes the standby in DIR a primary (waits until it accepts writes) and prints
#                             its URL
#
# initdb refuses to run as root: as root the server runs as the "postgres" system user, owning DIR.
set -euo pipefail

usage() {
    echo "usage: $0 start|pause|stop|kill|promote DIR" >&2
    echo "       $0 start-standby PRIMARY_DIR DIR" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
cmd=$1
if [[ $cmd == start-standby ]]; then
    [[ $# -eq 3 ]] || usage
    primary=$(realpath -m "$2")
    dir=$(realpath -m "$3")
else
    [[ $# -eq 2 ]] || usage
    dir=$(realpath -m "$2")
fi
# The server binaries run as another user when we are root: they must be able to stand in the cwd.
cd /
# Commands on one DIR never overlap: a clean-up's stop waits for a start still in progress.
exec 9>"$dir.lock"
flock 9

die() {
    echo "pg-cluster: $*" >&2
    exit 1
}

bindir() {
    local candidates=(/usr/lib/postgresql/*/bin)
    local best
    best=$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)
    [[ -x $best/initdb && -x $best/pg_ctl ]] ||
        die "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: install the Debian package postgresql (apt-get install postgresql, or bash scripts/install-deps.sh)"
    echo "$best"
}

# as_owner COMMAND...: runs a server binary as the cluster's owner, without the locks' descriptors (a server
# that inherited one would hold that lock for its lifetime).
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@" 8>&- 9>&-
    else
        "$@" 8>&- 9>&-
    fi
}

# A port nobody listens on now. Another process may take it before the server binds: start retries.
free_port() {
    if command -v python3 >/dev/null; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "found no free port"
}

url() {
    echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/p11shim"
}

# server_start: starts the initialized cluster on the port in $dir/port; fails if it cannot bind.
server_start() {
    local bin=$1
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -s \
        -o "-p $(cat "$dir/port")" start >&2
}

# start_on_free_port: starts the initialized cluster in $dir on a free port, recorded in $dir/port.
start_on_free_port() {
    local bin=$1
    local attempt port
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        echo "$port" >"$dir/port"
        if server_start "$bin"; then
            return
        fi
        grep -q "could not bind\|could not create any TCP/IP sockets" "$dir/server.log" ||
            die "server did not start; see $dir/server.log"
        [[ $attempt -lt 5 ]] || die "server did not start: no free port after 5 attempts; see $dir/server.log"
    done
}

start() {
    local bin
    bin=$(bindir)
    if [[ -f $dir/port ]]; then
        # Paused before: same data, same port, so clients holding the URL reconnect.
        server_start "$bin" || die "server did not start again; see $dir/server.log"
        url
        return
    fi
    mkdir -p "$dir"
    [[ -z $(ls -A "$dir") ]] || die "$dir is not empty"
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no postgres system user: install the Debian package postgresql"
        chown postgres: "$dir"
        runuser -u postgres -- test -w "$dir" ||
            die "the postgres user cannot write to $dir (is a parent directory private to root?)"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 ||
        die "initdb failed; see $dir/initdb.log"
    cat >>"$dir/data/postgresql.conf" <<EOF

# pg-cluster.sh: throwaway test cluster
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    start_on_free_port "$bin"
    as_owner "$bin/psql" -q -h 127.0.0.1 -p "$(cat "$dir/port")" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c 'CREATE DATABASE p11shim' >&2 || die "could not create the database p11shim"
    url
}

pause() {
    local bin
    bin=$(bindir)
    if [[ -d $dir/data ]] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -s stop >&2
    fi
}

kill_server() {
    local bin
    bin=$(bindir)
    if [[ -d $dir/data ]] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -s stop >&2
    fi
}

# psql_on PORT SQL: runs SQL as postgres on the server at 127.0.0.1:PORT; prints the bare result.
psql_on() {
    local bin
    bin=$(bindir)
    as_owner "$bin/psql" -q -X -t -A -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -c "$2"
}

start_standby() {
    local bin
    bin=$(bindir)
    [[ -f $primary/port && -d $primary/data ]] || die "$primary is not a cluster made by this script"
    as_owner "$bin/pg_ctl" -D "$primary/data" status >/dev/null 2>&1 || die "the primary in $primary is not running"
    [[ ! -f $dir/port ]] || die "$dir holds a cluster already (start it with: $0 start $dir)"
    # The primary's configuration changes below: no other command on it meanwhile. Always taken after the
    # standby's lock, never before it.
    exec 8>"$primary.lock"
    flock 8
    mkdir -p "$dir"
    [[ -z $(ls -A "$dir") ]] || die "$dir is not empty"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres: "$dir"
        runuser -u postgres -- test -w "$dir" ||
            die "the postgres user cannot write to $dir (is a parent directory private to root?)"
    fi
    local pport
    pport=$(cat "$primary/port")
    # Replication connections from 127.0.0.1 (initdb's trust set-up has this line; a cluster edited since may
    # not).
    if ! grep -Eq '^host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' \
        "$primary/data/pg_hba.conf"; then
        echo "host replication all 127.0.0.1/32 trust" >>"$primary/data/pg_hba.conf"
        psql_on "$pport" "SELECT pg_reload_conf()" >/dev/null || die "could not reload the primary's configuration"
    fi
    as_owner "$bin/pg_basebackup" -h 127.0.0.1 -p "$pport" -U postgres -D "$dir/data" -R -X stream \
        -c fast --no-sync >"$dir/basebackup.log" 2>&1 || die "pg_basebackup failed; see $dir/basebackup.log"
    # The standby's name in the primary's synchronous_standby_names: its walreceiver's application_name is its
    # cluster_name.
    local name
    name="standby_$(basename "$dir" | tr -c 'a-zA-Z0-9\n' '_')"
    cat >>"$dir/data/postgresql.conf" <<END

# pg-cluster.sh: streaming standby of $primary
unix_socket_directories = '$dir'
cluster_name = '$name'
END
    start_on_free_port "$bin"
    # Synchronous from now on: a commit on the primary returns once this standby has flushed its WAL, so the
    # standby, once promoted, has every commit a client saw succeed. postgresql.auto.conf overrides the
    # throwaway configuration's synchronous_commit = off; the standby's copy of it was taken before.
    { psql_on "$pport" "ALTER SYSTEM SET synchronous_commit = on" &&
        psql_on "$pport" "ALTER SYSTEM SET synchronous_standby_names = '\"$name\"'" &&
        psql_on "$pport" "SELECT pg_reload_conf()"; } >/dev/null ||
        die "could not make the primary replicate synchronously"
    local state=""
    for _ in $(seq 300); do
        state=$(psql_on "$pport" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$name' AND state = 'streaming'") || true
        [[ $state == sync ]] && break
        sleep 0.1
    done
    [[ $state == sync ]] || die "the standby does not replicate synchronously after 30 s; see $dir/server.log"
    url
}

promote() {
    local bin
    bin=$(bindir)
    [[ -f $dir/port && -d $dir/data ]] || die "$dir is not a cluster made by this script"
    as_owner "$bin/pg_ctl" -D "$dir/data" -w -t 60 -s promote >&2 || die "promotion failed; see $dir/server.log"
    url
}

case $cmd in
start) start ;;
pause) pause ;;
kill) kill_server ;;
start-standby) start_standby ;;
promote) promote ;;
stop)
    if [[ ! -d $dir ]]; then
        rm -f "$dir.lock"
        exit 0
    fi
    pause
    rm -rf "$dir" "$dir.lock"
    ;;
*) usage ;;
esac
