#!/usr/bin/env bash
# Prosody (Debian's package, 0.12 on bookworm) as a baseline XMPP server for
# the benchmarks: one self-contained, throw-away instance per directory.
#
#   benches/prosody.sh install
#       apt-get install prosody if missing; the system service is left
#       stopped and disabled (nothing on 5222/5269/5280/5347).
#   benches/prosody.sh start DIR PORT DOMAIN
#       config, data, logs, pid file and a self-signed certificate for DOMAIN
#       all under DIR; c2s on 127.0.0.1:PORT only (STARTTLS required, no s2s,
#       no http, no components); waits until the port answers; the last line
#       printed is the pid.
#   benches/prosody.sh users DIR DOMAIN PREFIX COUNT PASSWORD
#       accounts PREFIX0..PREFIX{COUNT-1}@DOMAIN (internal_hashed, SCRAM-SHA-1
#       keys written straight into the store: ~2 s per 1,000 users, where one
#       prosodyctl call per user takes ~0.08 s each, ~80 s per 1,000). The
#       first user goes through prosodyctl and the others' keys are checked
#       against it; if the instance runs, the last user's PLAIN login is tried.
#       Works with the instance running or stopped; re-running resets passwords.
#   benches/prosody.sh stop DIR
#       SIGTERM, SIGKILL after 10 s; no-op if not running.
#   benches/prosody.sh status DIR        exit 0 if that instance is running
#
# Layout of DIR: prosody.cfg.lua, data/, prosody.log, prosody.out (stdout and
# stderr), prosody.pid, DOMAIN.crt / DOMAIN.key (the client must trust the crt).
#
# Environment:
#   PROSODY_SCRAM_ITERATIONS  PBKDF2 iterations of stored keys (default 4096,
#                             Switchboard's default; Prosody's own is 10000).
#                             PLAIN logins cost one PBKDF2 of this size each.
#   PROSODY_CERT_KEY          ec (P-256, like rcgen's default; default) or rsa
#   PROSODY_LOG_LEVEL         min level written to prosody.log (default info)
#   PROSODY_START_TIMEOUT     seconds to wait for the port (default 30)
set -euo pipefail

log() { echo "prosody: $*" >&2; }
die() { echo "prosody: error: $*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
prosody: usage: $(basename "$0") COMMAND ...
  install                                  install Debian's prosody, system service off
  start DIR PORT DOMAIN                    start an instance in DIR on 127.0.0.1:PORT
  users DIR DOMAIN PREFIX COUNT PASSWORD   create PREFIX0..PREFIX{COUNT-1}@DOMAIN
  stop DIR                                 stop the instance in DIR
  status DIR                               exit 0 if the instance in DIR runs
EOF
    exit 2
}

SCRAM_ITERATIONS="${PROSODY_SCRAM_ITERATIONS:-4096}"
CERT_KEY="${PROSODY_CERT_KEY:-ec}"
LOG_LEVEL="${PROSODY_LOG_LEVEL:-info}"
START_TIMEOUT="${PROSODY_START_TIMEOUT:-30}"

# --- install -------------------------------------------------------------------

SYSTEM_PORTS=(5222 5269 5280 5281 5347)

# pids of processes listening on TCP port $1
listeners_of_port() {
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true
}

is_prosody_pid() {
    local pid=$1
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q prosody
}

# $1 = timeout in tenths of a second, rest = pids; 0 once all are gone
wait_gone() {
    local tenths=$1 i pid alive
    shift
    for ((i = 0; i < tenths; i++)); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    return 1
}

# The package's own daemon (started by its postinst or an init system), by
# pid: the system pid file, then any prosody listening on the system ports.
# Benchmark instances (their own ports and pid files) are left alone.
stop_system_daemon() {
    local pids=() pid port f
    for f in /run/prosody/prosody.pid /var/run/prosody/prosody.pid; do
        [[ -s $f ]] || continue
        pid=$(tr -dc '0-9' <"$f")
        [[ -n $pid ]] && is_prosody_pid "$pid" && pids+=("$pid")
    done
    for port in "${SYSTEM_PORTS[@]}"; do
        for pid in $(listeners_of_port "$port"); do
            # Instances of this script always run with --config DIR/...
            is_prosody_pid "$pid" && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--config' \
                && pids+=("$pid")
        done
    done
    ((${#pids[@]})) || return 0
    mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -u)
    log "stopping the system prosody daemon (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait_gone 100 "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
}

disable_system_service() {
    if command -v systemctl >/dev/null 2>&1; then
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now prosody.service >/dev/null 2>&1 || true
        else
            # systemd not running: disable still removes the unit's symlinks.
            systemctl disable prosody.service >/dev/null 2>&1 || true
        fi
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [[ -e /etc/init.d/prosody ]]; then
        update-rc.d prosody disable >/dev/null 2>&1 || true
    fi
}

prosody_version() {
    dpkg-query -W -f '${Version}' prosody 2>/dev/null || echo unknown
}

cmd_install() {
    (($# == 0)) || usage
    if ! command -v prosody >/dev/null 2>&1 || ! command -v prosodyctl >/dev/null 2>&1; then
        ((EUID == 0)) || die "not root: run as root to apt-get install prosody"
        # Keep the postinst from starting the daemon where nothing else does.
        local policy=/usr/sbin/policy-rc.d own_policy=0
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            own_policy=1
        fi
        log "installing Debian's prosody package"
        local ok=1
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q prosody >&2; then
            log "install failed; running apt-get update and retrying"
            apt-get update -q >&2 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q prosody >&2 || ok=0
        fi
        if ((own_policy)); then rm -f "$policy"; fi
        ((ok)) || die "apt-get install prosody failed"
    else
        log "prosody already installed"
    fi
    stop_system_daemon
    disable_system_service
    local port
    for port in "${SYSTEM_PORTS[@]}"; do
        [[ -z $(listeners_of_port "$port") ]] || log "warning: something still listens on port $port"
    done
    log "version $(prosody_version); system service stopped and disabled"
}

# --- instance helpers ----------------------------------------------------------

require_prosody() {
    command -v prosody >/dev/null 2>&1 || die "prosody is not installed: run '$0 install' first"
}

abs_dir() {
    mkdir -p "$1"
    (cd "$1" && pwd)
}

# pid of the instance in DIR if it is running, else nothing (exit 1)
instance_pid() {
    local dir=$1 f pid
    for f in "$dir/prosody.pid" "$dir/prosody.launch.pid"; do
        [[ -s $f ]] || continue
        pid=$(tr -dc '0-9' <"$f")
        [[ -n $pid ]] || continue
        if kill -0 "$pid" 2>/dev/null && is_prosody_pid "$pid" \
            && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/prosody.cfg.lua"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

# Lua string literal
lua_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

port_answers() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

valid_domain() {
    [[ $1 =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]]
}

make_cert() {
    local dir=$1 domain=$2
    local crt="$dir/$domain.crt" key="$dir/$domain.key"
    if [[ -s $crt && -s $key ]] && openssl x509 -in "$crt" -noout -checkend 86400 >/dev/null 2>&1 \
        && openssl x509 -in "$crt" -noout -ext subjectAltName 2>/dev/null | grep -qF "DNS:$domain"; then
        return 0
    fi
    local newkey
    case $CERT_KEY in
    ec) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    rsa) newkey=(-newkey rsa:2048) ;;
    *) die "PROSODY_CERT_KEY must be ec or rsa, not '$CERT_KEY'" ;;
    esac
    openssl req -x509 "${newkey[@]}" -nodes -days 3650 -sha256 \
        -keyout "$key.tmp" -out "$crt.tmp" -subj "/CN=$domain" \
        -addext "subjectAltName=DNS:$domain" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -addext "extendedKeyUsage=serverAuth" >/dev/null 2>&1 \
        || die "openssl could not make a certificate for $domain"
    chmod 600 "$key.tmp"
    mv -f "$key.tmp" "$key"
    mv -f "$crt.tmp" "$crt"
}

write_config() {
    local dir=$1 port=$2 domain=$3
    local crt="$dir/$domain.crt" key="$dir/$domain.key"
    local run_as_root=false
    ((EUID == 0)) && run_as_root=true
    cat >"$dir/prosody.cfg.lua.tmp" <<EOF
-- Written by benches/prosody.sh start; rewritten on every start.
-- Self-contained benchmark instance: everything lives under this directory.

data_path = $(lua_str "$dir/data")
pidfile = $(lua_str "$dir/prosody.pid")
daemonize = false            -- also passed as -F; the script backgrounds it
run_as_root = $run_as_root   -- mod_posix refuses root otherwise
umask = "027"

log = {
    { levels = { min = $(lua_str "$LOG_LEVEL") }, to = "file", filename = $(lua_str "$dir/prosody.log") };
}

network_backend = "epoll"    -- the default in 0.12; select is deprecated
network_settings = {
    nagle = false;           -- TCP_NODELAY on client sockets, like Switchboard
    tcp_backlog = 1024;      -- default 128 drops SYNs in a connection storm
}

-- Listeners: c2s on 127.0.0.1:$port only.
interfaces = { "127.0.0.1" }
local_interfaces = { "127.0.0.1" }
c2s_interfaces = { "127.0.0.1" }
c2s_ports = { $port }
c2s_direct_tls_ports = { }
legacy_ssl_ports = { }
s2s_ports = { }
s2s_direct_tls_ports = { }
component_ports = { }
http_ports = { }
https_ports = { }
proxy65_ports = { }

modules_enabled = {
    "roster";
    "saslauth";
    "tls";
    "disco";
    "ping";
    "presence";
    "offline";   -- messages to offline users are stored (data/<host>/offline/)
}
-- Autoloaded otherwise. posix stays: it writes the pid file and turns SIGTERM
-- into a clean shutdown. No mod_limits is loaded, so c2s reads are not
-- rate-limited; the limits below only matter if someone enables it.
modules_disabled = { "s2s"; "s2s_auth_certs"; "dialback"; "register"; "bosh"; "websocket"; "http" }
limits = {
    c2s = { rate = "100mb/s"; burst = "10s" };
}

allow_registration = false
authentication = "internal_hashed"
default_iteration_count = $SCRAM_ITERATIONS
storage = "internal"
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
s2s_require_encryption = true
certificates = $(lua_str "$dir/certs")
ssl = {
    certificate = $(lua_str "$crt");
    key = $(lua_str "$key");
}

VirtualHost $(lua_str "$domain")
    ssl = {
        certificate = $(lua_str "$crt");
        key = $(lua_str "$key");
    }
EOF
    mv -f "$dir/prosody.cfg.lua.tmp" "$dir/prosody.cfg.lua"
}

# --- start / stop ------------------------------------------------------------

cmd_start() {
    (($# == 3)) || usage
    local dir port=$2 domain=${3,,}
    require_prosody
    if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then die "bad port '$port'"; fi
    valid_domain "$domain" || die "bad domain '$3'"
    dir=$(abs_dir "$1")

    local pid
    if pid=$(instance_pid "$dir"); then
        if grep -qF "c2s_ports = { $port }" "$dir/prosody.cfg.lua" \
            && grep -qF "VirtualHost \"$domain\"" "$dir/prosody.cfg.lua"; then
            log "already running in $dir on 127.0.0.1:$port for $domain"
            log "certificate: $dir/$domain.crt"
            echo "$pid"
            return 0
        fi
        die "an instance with another port or domain runs in $dir (pid $pid): stop it first"
    fi
    if port_answers "$port"; then
        die "127.0.0.1:$port is already in use"
    fi

    mkdir -p "$dir/data" "$dir/certs"
    make_cert "$dir" "$domain"
    write_config "$dir" "$port" "$domain"
    rm -f "$dir/prosody.pid" "$dir/prosody.launch.pid"

    # Prosody is one process with one Lua thread; give it room for many sockets.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    local t0 t1
    t0=$(date +%s.%N)
    cd "$dir"
    setsid nohup prosody --config "$dir/prosody.cfg.lua" -F </dev/null >>"$dir/prosody.out" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/prosody.launch.pid"

    local i up=0
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$dir/prosody.out" "$dir/prosody.log" >&2 2>/dev/null || true
            die "prosody exited during start-up (see $dir/prosody.log)"
        fi
        if port_answers "$port"; then up=1; break; fi
        sleep 0.1
    done
    if ((!up)); then
        kill -TERM "$pid" 2>/dev/null || true
        die "127.0.0.1:$port did not answer within $START_TIMEOUT s (see $dir/prosody.log)"
    fi
    t1=$(date +%s.%N)
    log "started prosody $(prosody_version) in $dir on 127.0.0.1:$port for $domain ($(awk "BEGIN{printf \"%.2f\", $t1-$t0}") s)"
    log "certificate: $dir/$domain.crt"
    log "log: $dir/prosody.log"
    echo "$pid"
}

cmd_stop() {
    (($# == 1)) || usage
    [[ -d $1 ]] || { log "no directory $1: nothing to stop"; return 0; }
    local dir pid
    dir=$(cd "$1" && pwd)
    if ! pid=$(instance_pid "$dir"); then
        rm -f "$dir/prosody.pid" "$dir/prosody.launch.pid"
        log "not running in $dir"
        return 0
    fi
    log "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone 100 "$pid"; then
        log "still running after 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone 50 "$pid" || die "pid $pid survived SIGKILL"
    fi
    rm -f "$dir/prosody.pid" "$dir/prosody.launch.pid"
    log "stopped"
}

cmd_status() {
    (($# == 1)) || usage
    local pid
    if ! [[ -d $1 ]] || ! pid=$(instance_pid "$(cd "$1" && pwd)"); then
        log "not running"
        return 1
    fi
    log "running, pid $pid"
    echo "$pid"
}

# --- users -------------------------------------------------------------------

# Writes DIR/data/<host>/accounts/<user>.dat the way mod_auth_internal_hashed
# (via util.datamanager) does: SCRAM-SHA-1 StoredKey/ServerKey in hex, a UUID
# salt, the iteration count. The first user is created by prosodyctl itself
# and the Python derivation is checked against what Prosody wrote.
USERS_PY='
import hashlib, hmac, os, re, sys, uuid

data, host, prefix, first, count, password, iterations = sys.argv[1:8]
first, count, iterations = int(first), int(count), int(iterations)

def enc(s):  # util.datamanager encode: every non-alphanumeric byte -> %xx
    return "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "%%%02x" % b
                   for b in s.encode())

def keys(pw, salt, it):
    salted = hashlib.pbkdf2_hmac("sha1", pw.encode(), salt.encode(), it)
    client = hmac.new(salted, b"Client Key", hashlib.sha1).digest()
    stored = hashlib.sha1(client).hexdigest()
    server = hmac.new(salted, b"Server Key", hashlib.sha1).hexdigest()
    return stored, server

accounts = os.path.join(data, enc(host), "accounts")
os.makedirs(accounts, exist_ok=True)

# Check the derivation against the account prosodyctl wrote.
ref = open(os.path.join(accounts, enc(prefix + "0") + ".dat")).read()
field = lambda k: re.search(r"\[\"%s\"\] = \"?([^\";]*)\"?;" % k, ref).group(1)
stored, server = keys(password, field("salt"), int(field("iteration_count")))
if (stored, server) != (field("stored_key"), field("server_key")):
    sys.exit("prosody: error: SCRAM keys do not match what prosodyctl stored")

for i in range(first, count):
    user = "%s%d" % (prefix, i)
    salt = str(uuid.uuid4())
    stored, server = keys(password, salt, iterations)
    path = os.path.join(accounts, enc(user) + ".dat")
    with open(path + "~", "w") as f:
        f.write("return {\n\t[\"iteration_count\"] = %d;\n\t[\"salt\"] = \"%s\";\n"
                "\t[\"server_key\"] = \"%s\";\n\t[\"stored_key\"] = \"%s\";\n};\n"
                % (iterations, salt, server, stored))
    os.replace(path + "~", path)
'

# STARTTLS + SASL PLAIN login, trusting DIR's certificate: exit 0 on <success/>.
LOGIN_PY='
import base64, re, socket, ssl, sys
port, domain, user, password, cafile = int(sys.argv[1]), *sys.argv[2:6]
def until(s, pat):
    buf = b""
    while not re.search(pat, buf):
        d = s.recv(65536)
        if not d:
            sys.exit("prosody: error: connection closed: %r" % buf)
        buf += d
    return buf
hello = ("<?xml version=\"1.0\"?><stream:stream to=\"%s\" xmlns=\"jabber:client\" "
         "xmlns:stream=\"http://etherx.jabber.org/streams\" version=\"1.0\">" % domain).encode()
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.sendall(hello)
until(s, rb"</stream:features>")
s.sendall(b"<starttls xmlns=\"urn:ietf:params:xml:ns:xmpp-tls\"/>")
until(s, rb"<proceed")
s = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname=domain)
s.sendall(hello)
until(s, rb"</stream:features>")
token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
s.sendall(("<auth xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\" mechanism=\"PLAIN\">%s</auth>" % token).encode())
ok = b"<success" in until(s, rb"<(success|failure)")
s.sendall(b"</stream:stream>")
s.close()
sys.exit(0 if ok else "prosody: error: PLAIN login of %s@%s failed" % (user, domain))
'

cmd_users() {
    (($# == 5)) || usage
    local dir domain=${2,,} prefix=${3,,} count=$4 password=$5
    require_prosody
    [[ -f $1/prosody.cfg.lua ]] || die "no $1/prosody.cfg.lua: run '$0 start' first"
    dir=$(cd "$1" && pwd)
    valid_domain "$domain" || die "bad domain '$2'"
    grep -qF "VirtualHost \"$domain\"" "$dir/prosody.cfg.lua" || die "$domain is not served by the instance in $dir"
    [[ $prefix =~ ^[a-z0-9._-]+$ ]] || die "PREFIX must match [a-z0-9._-]+ (nodeprep-stable)"
    [[ $count =~ ^[1-9][0-9]*$ ]] || die "bad COUNT '$count'"
    [[ -n $password && $password != *$'\n'* ]] || die "empty or multi-line PASSWORD"

    local t0 t1
    t0=$(date +%s.%N)
    # First user through Prosody's own tooling (password on stdin, twice:
    # "Enter new password" and "Retype"); register overwrites an existing one.
    printf '%s\n%s\n' "$password" "$password" \
        | prosodyctl --config "$dir/prosody.cfg.lua" register "${prefix}0" "$domain" >"$dir/prosodyctl.out" 2>&1 \
        || { cat "$dir/prosodyctl.out" >&2; die "prosodyctl register ${prefix}0 $domain failed"; }
    # The rest (and a check of the first) written directly.
    python3 -c "$USERS_PY" "$dir/data" "$domain" "$prefix" 1 "$count" "$password" "$SCRAM_ITERATIONS" \
        || die "writing accounts failed"
    t1=$(date +%s.%N)
    local port last="${prefix}$((count - 1))"
    if instance_pid "$dir" >/dev/null; then
        port=$(sed -n 's/^c2s_ports = { \([0-9]*\) }$/\1/p' "$dir/prosody.cfg.lua")
        python3 -c "$LOGIN_PY" "$port" "$domain" "$last" "$password" "$dir/$domain.crt" \
            || die "$last@$domain cannot log in"
        log "checked: $last@$domain logs in (STARTTLS, PLAIN) on 127.0.0.1:$port"
    fi
    log "$count users ${prefix}0..${prefix}$((count - 1))@$domain ready ($(awk "BEGIN{printf \"%.2f\", $t1-$t0}") s, SCRAM-SHA-1, $SCRAM_ITERATIONS iterations)"
}

# --- main --------------------------------------------------------------------

main() {
    (($#)) || usage
    local cmd=$1
    shift
    case $cmd in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    users) cmd_users "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
}

main "$@"
