#!/usr/bin/env bash
# The compliance search through HTTP: `switchboard serve` (the embedded
# default) over the SQLite dataset of the compliance_search bench, and that
# bench's queries sent to `GET /api/v1/archive/messages` with a
# compliance-officer token (each query is audited into the compliance log,
# as always).
#
#   SB_ROWS=20000000 benches/compliance-http.sh
#
# SB_ROWS must match the dataset (the bench generates or extends it first
# when it holds fewer rows; generate it with the bench alone, it is slow).
# SB_DB (default target/compliance-bench.db) names the dataset;
# SWITCHBOARD_BIN (default target/release/switchboard, built here) the
# server; SB_QUERIES the queries per kind (default 200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DB="$(realpath "${SB_DB:-target/compliance-bench.db}")"
BIN="${SWITCHBOARD_BIN:-target/release/switchboard}"
[ -f "$DB" ] || { echo "no dataset at $DB: run the compliance_search bench first" >&2; exit 1; }
if [ -z "${SWITCHBOARD_BIN:-}" ]; then
    cargo build --release --bin switchboard
fi

dir="$(mktemp -d)"
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir "$dir/data"
ln -s "$DB" "$dir/data/switchboard.db"
export SWITCHBOARD__DATA_DIR="$dir/data" \
    SWITCHBOARD__HTTP__LISTEN=127.0.0.1:5381 \
    SWITCHBOARD__XMPP__C2S_LISTEN=127.0.0.1:15222 \
    SWITCHBOARD__XMPP__C2S_TLS_LISTEN=127.0.0.1:15223 \
    SWITCHBOARD__SIP__UDP_LISTEN=127.0.0.1:15060 \
    SWITCHBOARD__SIP__TCP_LISTEN=127.0.0.1:15060 \
    SWITCHBOARD__SIP__TLS_LISTEN=127.0.0.1:15061

token="$("$BIN" token create --role compliance-officer --name "bench-$$" | tail -n 1)"
"$BIN" serve >"$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    curl -sf -o /dev/null http://127.0.0.1:5381/api/openapi.json && break
    kill -0 "$pid" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    sleep 0.2
done

SB_HTTP=127.0.0.1:5381 SB_TOKEN="$token" SB_DB="$DB" \
    cargo bench -p switchboard-projections --bench compliance_search
"$BIN" token revoke "bench-$$" >/dev/null
