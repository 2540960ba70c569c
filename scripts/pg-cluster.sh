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
#
# initdb refuses to run as root: as root the server runs as the "postgres" system user, owning DIR.
set -euo pipefail

usage() {
    echo "usage: $0 start|pause|stop DIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
cmd=$1
dir=$(realpath -m "$2")
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

# as_owner COMMAND...: runs a server binary as the cluster's owner, without the lock's descriptor (a server
# that inherited it would hold the lock for its lifetime).
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@" 9>&-
    else
        "$@" 9>&-
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
    local attempt port
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        echo "$port" >"$dir/port"
        if server_start "$bin"; then
            break
        fi
        grep -q "could not bind\|could not create any TCP/IP sockets" "$dir/server.log" ||
            die "server did not start; see $dir/server.log"
        [[ $attempt -lt 5 ]] || die "server did not start: no free port after 5 attempts; see $dir/server.log"
    done
    as_owner "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
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

case $cmd in
start) start ;;
pause) pause ;;
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
