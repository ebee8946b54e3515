#!/usr/bin/env bash
# Switchboard and Prosody under the same XMPP load generator
# (benches/xmpp_load.rs), one after the other on this machine, same users,
# same TLS, same SASL mechanism (PLAIN over STARTTLS; both verify it against
# salted keys with the same PBKDF2 iteration count).
#
#   USERS=100 SECS=5 BURST=50 benches/xmpp-compare.sh   (defaults: USERS=200 RATE=2000 SECS=10 BURST=200)
#
# Prints one Markdown row per server (see BENCHMARKS.md for the header).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

USERS="${USERS:-200}"
ITERATIONS="${ITERATIONS:-4096}"
export XMPP_USERS="$USERS" XMPP_RATE="${RATE:-2000}" XMPP_SECS="${SECS:-10}" \
    XMPP_BURST="${BURST:-200}" XMPP_DOMAIN=example.com XMPP_USER_PREFIX=user XMPP_PASSWORD=pw

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    benches/prosody.sh stop "$work/prosody" >/dev/null 2>&1 || true
}
trap cleanup EXIT

cargo build --release --quiet --bin switchboard
cargo bench --quiet --bench xmpp_load --no-run 2>/dev/null

echo "compare: Switchboard (embedded default)" >&2
export SWITCHBOARD__DATA_DIR="$work/switchboard" SWITCHBOARD__DOMAINS='["example.com"]' \
    SWITCHBOARD__XMPP__C2S_LISTEN=127.0.0.1:18222 SWITCHBOARD__XMPP__C2S_TLS_LISTEN=127.0.0.1:18223 \
    SWITCHBOARD__HTTP__LISTEN=127.0.0.1:18280 SWITCHBOARD__AUTH__SCRAM_ITERATIONS="$ITERATIONS" \
    SWITCHBOARD__AUTH__MAX_FAILURES_PER_ADDRESS=0 SWITCHBOARD_LOG=warn
target/release/switchboard serve & pids+=($!)
server=$!
for _ in $(seq 100); do [ -S "$work/switchboard/admin.sock" ] && break; sleep 0.1; done
for i in $(seq 0 $((USERS - 1))); do
    echo pw | target/release/switchboard user add "user$i@example.com" --password-stdin >/dev/null
done
XMPP_ADDR=127.0.0.1:18222 XMPP_CERT="$work/switchboard/tls/cert.pem" SERVER_PID="$server" \
    XMPP_LABEL="Switchboard $(git rev-parse --short HEAD) (embedded)" \
    cargo bench --quiet --bench xmpp_load
kill "$server"; wait "$server" 2>/dev/null || true

echo "compare: Prosody" >&2
benches/prosody.sh install >&2
prosody_pid="$(benches/prosody.sh start "$work/prosody" 17222 example.com | tail -1)"
PROSODY_SCRAM_ITERATIONS="$ITERATIONS" benches/prosody.sh users "$work/prosody" example.com user "$USERS" pw >&2
XMPP_ADDR=127.0.0.1:17222 XMPP_CERT="$(ls "$work"/prosody/*.crt | head -1)" SERVER_PID="$prosody_pid" \
    XMPP_LABEL="Prosody $(dpkg-query -W -f='${Version}' prosody)" \
    cargo bench --quiet --bench xmpp_load
benches/prosody.sh stop "$work/prosody" >&2
