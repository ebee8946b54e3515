#!/usr/bin/env bash
# Switchboard and Prosody under the same XMPP load generator
# (benches/xmpp_load.rs), one after the other on this machine, same users,
# same TLS, same SASL mechanism (PLAIN over STARTTLS; both verify it against
# salted keys with the same PBKDF2 iteration count).
#
#   USERS=100 SECS=5 BURST=50 benches/xmpp-compare.sh   (defaults: USERS=200 RATE=2000 SECS=10 BURST=200)
#   IDLE=10000 USERS=100 SECS=5 BURST=50 benches/xmpp-compare.sh
#
# IDLE (default 0): first log IDLE sessions in and keep them idle, and
# report the server's RSS growth per session (on a freshly started server,
# users already provisioned); they disconnect before the message run.
# SWITCHBOARD_BIN (default target/release/switchboard, built here) runs
# another build of the server, e.g. an older one for a before/after in one
# run. XMPP_LOAD_BIN: a built load generator (default: built here).
# SKIP_PROSODY=1 leaves Prosody out.
#
# Prints Markdown rows per server (see BENCHMARKS.md for the headers): the
# idle row (server | sessions | logins/s | RSS before MiB | RSS after MiB |
# KiB/session) and the message row.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

USERS="${USERS:-200}"
IDLE="${IDLE:-0}"
ITERATIONS="${ITERATIONS:-4096}"
BIN="${SWITCHBOARD_BIN:-target/release/switchboard}"
export XMPP_USERS="$USERS" XMPP_RATE="${RATE:-2000}" XMPP_SECS="${SECS:-10}" \
    XMPP_BURST="${BURST:-200}" XMPP_DOMAIN=example.com XMPP_USER_PREFIX=user XMPP_PASSWORD=pw
accounts=$((IDLE > USERS ? IDLE : USERS))
# Each idle session is a socket on both ends (server and load generator).
if ((IDLE > 0)); then
    ulimit -n "$(ulimit -Hn)"
    (($(ulimit -n) > IDLE + 1000)) || { echo "compare: ulimit -n $(ulimit -n) is too low for IDLE=$IDLE" >&2; exit 1; }
fi

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    benches/prosody.sh stop "$work/prosody" >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

[ -n "${SWITCHBOARD_BIN:-}" ] || cargo build --release --quiet --bin switchboard
# Built once and run directly: no cargo (nor its build lock) between phases.
LOAD="${XMPP_LOAD_BIN:-$(cargo bench --quiet --bench xmpp_load --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*xmpp_load[^"]*"' | tail -1 | cut -d'"' -f4)}"
[ -x "$LOAD" ] || { echo "compare: no xmpp_load executable" >&2; exit 1; }
load() { "$LOAD" --bench; }

echo "compare: Switchboard (embedded default, $BIN)" >&2
export SWITCHBOARD__DATA_DIR="$work/switchboard" SWITCHBOARD__DOMAINS='["example.com"]' \
    SWITCHBOARD__XMPP__C2S_LISTEN=127.0.0.1:18222 SWITCHBOARD__XMPP__C2S_TLS_LISTEN=127.0.0.1:18223 \
    SWITCHBOARD__HTTP__LISTEN=127.0.0.1:18280 SWITCHBOARD__AUTH__SCRAM_ITERATIONS="$ITERATIONS" \
    SWITCHBOARD__AUTH__MAX_FAILURES_PER_ADDRESS=0 SWITCHBOARD_LOG=warn
start_switchboard() {
    rm -f "$work/switchboard/admin.sock"
    "$BIN" serve & pids+=($!)
    server=$!
    for _ in $(seq 300); do [ -S "$work/switchboard/admin.sock" ] && break; sleep 0.1; done
    [ -S "$work/switchboard/admin.sock" ] || { echo "compare: switchboard did not start" >&2; exit 1; }
}
stop_switchboard() { kill "$server"; wait "$server" 2>/dev/null || true; }
label="Switchboard $(git rev-parse --short HEAD) (embedded)"
[ -n "${SWITCHBOARD_BIN:-}" ] && label="Switchboard $BIN (embedded)"
start_switchboard
XMPP_MODE=provision XMPP_USERS="$accounts" XMPP_ADMIN_SOCKET="$work/switchboard/admin.sock" \
    XMPP_ITERATIONS="$ITERATIONS" load >&2
if ((IDLE > 0)); then
    # A fresh process: what provisioning allocated does not hide the growth.
    stop_switchboard
    start_switchboard
    XMPP_MODE=idle XMPP_USERS="$IDLE" XMPP_ADDR=127.0.0.1:18222 \
        XMPP_CERT="$work/switchboard/tls/cert.pem" SERVER_PID="$server" XMPP_LABEL="$label" load
fi
XMPP_ADDR=127.0.0.1:18222 XMPP_CERT="$work/switchboard/tls/cert.pem" SERVER_PID="$server" \
    XMPP_LABEL="$label" load
stop_switchboard

[ -n "${SKIP_PROSODY:-}" ] && exit 0
echo "compare: Prosody" >&2
benches/prosody.sh install >&2
prosody_pid="$(benches/prosody.sh start "$work/prosody" 17222 example.com | tail -1)"
PROSODY_SCRAM_ITERATIONS="$ITERATIONS" benches/prosody.sh users "$work/prosody" example.com user "$accounts" pw >&2
plabel="Prosody $(dpkg-query -W -f='${Version}' prosody)"
if ((IDLE > 0)); then
    benches/prosody.sh stop "$work/prosody" >&2
    prosody_pid="$(benches/prosody.sh start "$work/prosody" 17222 example.com | tail -1)"
    XMPP_MODE=idle XMPP_USERS="$IDLE" XMPP_ADDR=127.0.0.1:17222 \
        XMPP_CERT="$(ls "$work"/prosody/*.crt | head -1)" SERVER_PID="$prosody_pid" XMPP_LABEL="$plabel" load
fi
XMPP_ADDR=127.0.0.1:17222 XMPP_CERT="$(ls "$work"/prosody/*.crt | head -1)" SERVER_PID="$prosody_pid" \
    XMPP_LABEL="$plabel" load
benches/prosody.sh stop "$work/prosody" >&2
