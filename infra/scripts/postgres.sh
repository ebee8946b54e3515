#!/usr/bin/env bash
# Local PostgreSQL for Switchboard development and tests, in a dedicated data directory
# (never the Debian default cluster).
#
#   infra/scripts/postgres.sh install|start|stop|status|url
#
# State lives in ${SWITCHBOARD_INFRA_DIR:-<repo>/.infra}/postgres:
#   data/   the cluster (initdb'd on first start)   run/  unix socket
#   log/postgres.log
# Listens on 127.0.0.1:${PG_PORT:-5432} only. Creates role switchboard/switchboard
# (LOGIN CREATEDB) and databases switchboard, switchboard_test owned by it.
# When run as root, the server runs as the `postgres` OS user (postgres refuses root).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
INFRA_DIR="${SWITCHBOARD_INFRA_DIR:-$REPO_ROOT/.infra}"
PG_STATE="$INFRA_DIR/postgres"
PG_DATA="$PG_STATE/data"
PG_RUN="$PG_STATE/run"
PG_LOGDIR="$PG_STATE/log"
PG_LOG="$PG_LOGDIR/postgres.log"
PG_PORT="${PG_PORT:-5432}"
PG_USER_NAME="switchboard"
PG_USER_PASS="switchboard"
PG_DATABASES=(switchboard switchboard_test)

log() { echo "postgres: $*" >&2; }
die() { echo "postgres: error: $*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") install|start|stop|status|url
  install  apt-get install postgresql if no server binaries are present
  start    initdb (first time), start on 127.0.0.1:$PG_PORT, ensure role + databases
  stop     fast shutdown; no-op if not running
  status   exit 0 if running and accepting connections
  url      print postgres://$PG_USER_NAME:$PG_USER_PASS@127.0.0.1:$PG_PORT/switchboard
state: $PG_STATE
EOF
    exit 2
}

LOCKED=0
with_lock() {
    ((LOCKED)) && return 0
    LOCKED=1
    mkdir -p "$PG_STATE"
    exec 9>"$PG_STATE/.lock"
    if command -v flock >/dev/null 2>&1; then
        flock -w 300 9 || die "could not acquire $PG_STATE/.lock within 300 s"
    fi
}

# Server binaries: prefer the major version the data dir was created with.
find_bindir() {
    local want="" d
    [[ -f "$PG_DATA/PG_VERSION" ]] && want="$(cat "$PG_DATA/PG_VERSION")"
    if [[ -n "$want" ]]; then
        if [[ -x "/usr/lib/postgresql/$want/bin/initdb" ]]; then
            echo "/usr/lib/postgresql/$want/bin"
            return 0
        fi
        die "data dir $PG_DATA is PostgreSQL $want but /usr/lib/postgresql/$want/bin is missing (apt-get install postgresql-$want, or delete $PG_DATA)"
    fi
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
    [[ -n "$d" && -x "$d/initdb" ]] || return 1
    echo "$d"
}

cmd_install() {
    if find_bindir >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are missing and apt-get is not available; install PostgreSQL 15+ manually"
    ((EUID == 0)) || die "PostgreSQL server binaries are missing; run as root (or: sudo apt-get install -y postgresql)"
    with_lock
    export DEBIAN_FRONTEND=noninteractive
    # only refresh the package lists when apt does not know the package yet
    if ! apt-cache policy postgresql 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {ok = 1} END {exit !ok}'; then
        log "apt-get update"
        apt-get update -q >/dev/null || die "apt-get update failed"
    fi
    log "apt-get install -y postgresql"
    apt-get install -y -q postgresql >/dev/null || die "apt-get install -y postgresql failed"
    find_bindir >/dev/null || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
    # Debian's package may have created and started its default cluster; it is not ours,
    # but it must not sit on our port.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters -h 2>/dev/null | while read -r ver name port status _; do
            if [[ "$port" == "$PG_PORT" && "$status" == online* ]]; then
                log "stopping Debian default cluster $ver/$name that the package started on port $PG_PORT"
                pg_ctlcluster "$ver" "$name" stop || true
            fi
        done
    fi
    log "installed $(basename "$(dirname "$(find_bindir)")")"
}

# Run a command as the server's OS user.
as_pg() {
    # fd 9 is our lock: never let it leak into the postmaster (it would hold the lock forever)
    if ((EUID == 0)); then
        (cd / && runuser -u postgres -- "$@" 9>&-)
    else
        "$@" 9>&-
    fi
}

prepare_dirs() {
    mkdir -p "$PG_STATE" "$PG_RUN" "$PG_LOGDIR"
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 || die "OS user 'postgres' is missing (it comes with the postgresql package: run '$0 install')"
        # postgres must be able to traverse every parent of the state dir
        # (top-down: a path is only searchable if all of its parents are)
        local d="$PG_STATE" parents=() i
        while [[ "$d" != "/" && -n "$d" ]]; do
            parents=("$d" "${parents[@]}")
            d="$(dirname "$d")"
        done
        for i in "${parents[@]}"; do
            if ! (cd / && runuser -u postgres -- test -x "$i"); then
                log "making $i traversable (o+x) for the postgres user"
                chmod o+x "$i"
            fi
        done
        chown postgres:postgres "$PG_STATE" "$PG_RUN" "$PG_LOGDIR"
        if [[ -d "$PG_DATA" ]]; then chown -R postgres:postgres "$PG_DATA"; fi
        if [[ -f "$PG_LOG" ]]; then chown postgres:postgres "$PG_LOG"; fi
    fi
    chmod 700 "$PG_RUN"
}

initdb_if_needed() {
    local bindir="$1"
    [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
    local locale=C
    locale -a 2>/dev/null | grep -qixE 'c\.utf-?8' && locale=C.UTF-8
    log "initdb $PG_DATA ($("$bindir/postgres" --version | awk '{print $3}'), locale $locale)"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA"
    if ((EUID == 0)); then chown postgres:postgres "$PG_DATA"; fi
    chmod 700 "$PG_DATA"
    # local socket: trust (socket dir is 0700, only the server's OS user can reach it);
    # TCP: password (scram-sha-256)
    if ! as_pg "$bindir/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale="$locale" \
        --auth-local=trust --auth-host=scram-sha-256 >"$PG_LOGDIR/initdb.log" 2>&1; then
        cat "$PG_LOGDIR/initdb.log" >&2
        rm -rf "$PG_DATA"
        die "initdb failed"
    fi
}

write_config() {
    local conf="$PG_DATA/switchboard.conf"
    cat >"$conf" <<EOF
# generated by infra/scripts/postgres.sh on each start; edit the script, not this file
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
unix_socket_permissions = 0700
max_connections = 200
shared_buffers = 1GB
fsync = on
synchronous_commit = on
full_page_writes = on
wal_compression = lz4
wal_buffers = 64MB
max_wal_size = 4GB
checkpoint_timeout = 15min
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
log_min_duration_statement = -1
EOF
    if ((EUID == 0)); then chown postgres:postgres "$conf"; fi
    grep -qxF "include_if_exists = 'switchboard.conf'" "$PG_DATA/postgresql.conf" ||
        echo "include_if_exists = 'switchboard.conf'" >>"$PG_DATA/postgresql.conf"
}

server_running() { # our cluster's postmaster is alive
    local bindir="$1"
    [[ -f "$PG_DATA/postmaster.pid" ]] || return 1
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

running_port() { # port our running postmaster was started with (from postmaster.pid line 4)
    sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null || true
}

accepting() {
    pg_isready_bin -h 127.0.0.1 -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

pg_isready_bin() {
    local bindir
    bindir="$(find_bindir)"
    "$bindir/pg_isready" "$@"
}

port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        [[ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]]
    else
        timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
    fi
}

admin_psql() { # superuser psql over our private socket
    local bindir="$1"
    shift
    as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres "$@"
}

ensure_role_and_dbs() {
    local bindir="$1" d dblist=""
    for d in "${PG_DATABASES[@]}"; do dblist+="${dblist:+,}'$d'"; done
    admin_psql "$bindir" <<EOF
SET client_min_messages = warning;
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER_NAME') THEN
    CREATE ROLE $PG_USER_NAME LOGIN CREATEDB PASSWORD '$PG_USER_PASS';
    RAISE NOTICE 'created role $PG_USER_NAME';
  END IF;
END
\$\$;
SELECT format('CREATE DATABASE %I OWNER $PG_USER_NAME', d)
  FROM unnest(ARRAY[$dblist]) AS d
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d)
\gexec
EOF
}

cmd_start() {
    local bindir
    cmd_install
    bindir="$(find_bindir)" || die "PostgreSQL server binaries are missing (run: $0 install)"
    # fast path: already running on our port and accepting
    if server_running "$bindir" && [[ "$(running_port)" == "$PG_PORT" ]] && accepting; then
        ensure_role_and_dbs "$bindir"
        log "already running on 127.0.0.1:$PG_PORT"
        return 0
    fi
    with_lock
    if server_running "$bindir"; then
        local rp
        rp="$(running_port)"
        [[ -z "$rp" || "$rp" == "$PG_PORT" ]] ||
            die "our cluster is already running on port $rp, not PG_PORT=$PG_PORT; run '$0 stop' first"
        if accepting; then
            ensure_role_and_dbs "$bindir"
            log "already running on 127.0.0.1:$PG_PORT"
            return 0
        fi
    else
        if port_in_use "$PG_PORT"; then
            die "port $PG_PORT is already in use by another server ($(ss -ltnpH "sport = :$PG_PORT" 2>/dev/null | head -n1 | sed 's/  */ /g')); stop it (Debian cluster: pg_ctlcluster <ver> main stop) or set PG_PORT"
        fi
        prepare_dirs
        initdb_if_needed "$bindir"
        write_config
        log "starting $(basename "$(dirname "$bindir")") on 127.0.0.1:$PG_PORT (data $PG_DATA, log $PG_LOG)"
        if [[ ! -f "$PG_LOG" ]]; then
            : >"$PG_LOG"
            if ((EUID == 0)); then chown postgres:postgres "$PG_LOG"; fi
        fi
        if ! as_pg "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 2>&1; then
            log "pg_ctl start failed; last 30 lines of $PG_LOG:"
            tail -n 30 "$PG_LOG" >&2 || true
            exit 1
        fi
    fi
    local i
    for ((i = 0; i < 120; i++)); do
        accepting && break
        sleep 0.5
    done
    accepting || {
        tail -n 30 "$PG_LOG" >&2 || true
        die "server did not accept connections on 127.0.0.1:$PG_PORT within 60 s"
    }
    ensure_role_and_dbs "$bindir"
    log "ready: $(cmd_url)"
}

cmd_stop() {
    local bindir
    bindir="$(find_bindir)" || { log "not installed, not running"; return 0; }
    with_lock
    if ! server_running "$bindir"; then
        log "not running"
        return 0
    fi
    log "stopping"
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null ||
        die "pg_ctl stop failed (see $PG_LOG)"
    log "stopped"
}

cmd_status() {
    local bindir
    if ! bindir="$(find_bindir 2>/dev/null)" || ! server_running "$bindir"; then
        echo "postgres: not running"
        return 3
    fi
    if accepting; then
        echo "postgres: running (pid $(head -n1 "$PG_DATA/postmaster.pid")) on 127.0.0.1:$PG_PORT"
        return 0
    fi
    echo "postgres: postmaster alive but not accepting connections on 127.0.0.1:$PG_PORT"
    return 1
}

cmd_url() { echo "postgres://$PG_USER_NAME:$PG_USER_PASS@127.0.0.1:$PG_PORT/switchboard"; }

[[ $# -eq 1 ]] || usage
case "$1" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) cmd_url ;;
    *) usage ;;
esac
