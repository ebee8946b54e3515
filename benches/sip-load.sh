#!/usr/bin/env bash
# SIP load with SIPp against `switchboard serve` (release build, embedded log
# unless SWITCHBOARD__BUS__BACKEND=kafka and its settings are exported):
#
#   benches/sip-load.sh [register|message|subscribe|all]   (default all)
#
# register: digest REGISTER (tests/sip/register.xml: REGISTER, 401, REGISTER
#           with credentials, 200) at SIP_RATE calls/s for SIP_CALLS calls.
# message:  SIP→SIP MESSAGE: bob's device (benches/sip_receiver.py, which
#           answers 200) registered, alice sends benches/sip/message_timed.xml
#           (MESSAGE, 401, MESSAGE with credentials, 202) at SIP_RATE/s; the
#           router delivers each to bob's device, which times it from the
#           send stamp in its body (sender → device p50/p99/max).
# subscribe: SIP_SUBSCRIPTIONS (default 20,000) presence subscriptions
#           (tests/sip/subscribe_hold.xml: SUBSCRIBE, 401, SUBSCRIBE with
#           credentials, 200, NOTIFY) left active; prints the server's
#           resident memory before and after.
# Prints calls/s (successful calls over the run's wall time) and the
# response time of the authenticated request (SIPp rtd: send → 200/202)
# p50/p99/max from SIPp's per-call RTT file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

WHAT="${1:-all}"
RATE="${SIP_RATE:-5000}"
CALLS="${SIP_CALLS:-30000}"
LIMIT="${SIP_LIMIT:-2000}"   # concurrent calls
PORT="${SIP_PORT:-25060}"
# SIPp's socket buffers (its default, 64 KiB, drops datagrams in bursts: each
# drop is a 500 ms retransmission in the latency); the kernel caps them at
# net.core.rmem_max / wmem_max.
BUFF="${SIP_BUFF:-4194304}"

SIPP="$(infra/scripts/sipp.sh path)"
# SIP_NO_BUILD=1: use the release binary as it is.
[ -n "${SIP_NO_BUILD:-}" ] || cargo build --release --bin switchboard >&2
BIN="$ROOT/target/release/switchboard"

WORK="$(mktemp -d)"
SERVER_PID=""
RECEIVER_PID=""
cleanup() {
    [ -n "$RECEIVER_PID" ] && kill "$RECEIVER_PID" 2>/dev/null || true
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    [ -n "${SIP_KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

export SWITCHBOARD_LOG="${SWITCHBOARD_LOG:-warn}"
export SWITCHBOARD__DATA_DIR="$WORK/data"
export SWITCHBOARD__DOMAINS='["example.com"]'
export SWITCHBOARD__HTTP__LISTEN="127.0.0.1:$((PORT + 20))"
export SWITCHBOARD__XMPP__C2S_LISTEN="127.0.0.1:0"
export SWITCHBOARD__XMPP__C2S_TLS_LISTEN="127.0.0.1:0"
export SWITCHBOARD__SIP__UDP_LISTEN="127.0.0.1:$PORT"
export SWITCHBOARD__SIP__TCP_LISTEN="127.0.0.1:$PORT"
export SWITCHBOARD__SIP__TLS_LISTEN="127.0.0.1:$((PORT + 1))"
# The load comes from one address: no failed-login throttling in the way.
export SWITCHBOARD__AUTH__MAX_FAILURES_PER_ADDRESS=1000000

# A fresh server (data directory, users) for each load, so one load's
# leftovers (retransmissions to finished SIPp instances, stored messages)
# do not weigh on the next.
start_server() {
    stop_server
    rm -rf "$WORK/data"
    echo "alice pw" | "$BIN" user add alice@example.com --password-stdin >/dev/null
    echo "bob pw" | "$BIN" user add bob@example.com --password-stdin >/dev/null
    "$BIN" serve >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        curl -fs "http://$SWITCHBOARD__HTTP__LISTEN/readyz" >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "the server did not get ready" >&2
    exit 1
}
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# run NAME SCENARIO LOCAL_PORT ARGS...: one SIPp run; prints its line.
run() {
    local name="$1" scenario="$2" port="$3"
    shift 3
    local dir="$WORK/$name"
    mkdir -p "$dir"
    local start end
    start=$(date +%s.%N)
    (cd "$dir" && "$SIPP" "127.0.0.1:$PORT" -sf "${SCENARIOS:-$ROOT/tests/sip}/$scenario" \
        -i 127.0.0.1 -p "$port" -nostdin -key domain example.com \
        -r "$RATE" -m "$CALLS" -l "$LIMIT" -timeout 600s -buff_size "$BUFF" \
        -trace_rtt -rtt_freq 1000 -trace_stat -fd 1 "$@" >"$dir/sipp.out" 2>&1) || true
    end=$(date +%s.%N)
    python3 - "$dir" "$name" "$start" "$end" "$CALLS" <<'EOF'
import csv, glob, sys
d, name, start, end, calls = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
ok = failed = 0
stats = sorted(glob.glob(d + "/*_.csv"))
if stats:
    rows = list(csv.reader(open(stats[-1]), delimiter=";"))
    head, last = rows[0], rows[-1]
    ok = int(last[head.index("SuccessfulCall(C)")])
    failed = int(last[head.index("FailedCall(C)")])
rtts = []
for f in glob.glob(d + "/*_rtt.csv"):
    for row in csv.reader(open(f), delimiter=";"):
        if len(row) >= 3 and row[0] != "Date_ms":
            try:
                rtts.append(float(row[1]))
            except ValueError:
                pass
rtts.sort()
pct = lambda p: rtts[min(len(rtts) - 1, int(len(rtts) * p))] if rtts else float("nan")
secs = end - start
print(f"{name}: {ok}/{calls} calls ok, {failed} failed, {secs:.1f} s, {ok / secs:,.0f} calls/s; "
      f"rtd ms p50 {pct(0.50):.2f} p99 {pct(0.99):.2f} max {rtts[-1] if rtts else float('nan'):.2f} ({len(rtts)} samples)")
EOF
}

if [ "$WHAT" = register ] || [ "$WHAT" = all ]; then
    start_server
    run register register.xml $((PORT + 2)) -key user alice -au alice -ap "alice pw"
fi
if [ "$WHAT" = message ] || [ "$WHAT" = all ]; then
    start_server
    RECV_PORT=$((PORT + 3))
    # Bob's device: answers 200 and times each MESSAGE from its sender's
    # stamp (benches/sip_receiver.py).
    python3 benches/sip_receiver.py "$RECV_PORT" "$WORK/receiver.json" &
    RECEIVER_PID=$!
    (cd "$WORK" && "$SIPP" "127.0.0.1:$PORT" -sf "$ROOT/tests/sip/register_contact.xml" \
        -i 127.0.0.1 -p $((PORT + 4)) -nostdin -key domain example.com -key user bob \
        -key contact_port "$RECV_PORT" -au bob -ap "bob pw" -m 1 >"$WORK/register_bob.out" 2>&1) \
        || { echo "registering bob's device failed:" >&2; tail -20 "$WORK/register_bob.out" >&2; exit 1; }
    SCENARIOS="$ROOT/benches/sip" run message message_timed.xml $((PORT + 5)) -key user alice \
        -au alice -ap "alice pw" -key to bob -key text "bench message"
    sleep 2
    kill "$RECEIVER_PID" 2>/dev/null || true
    wait "$RECEIVER_PID" 2>/dev/null || true
    RECEIVER_PID=""
    python3 - "$WORK/receiver.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"bob's device received {r['received']} messages; sender to device ms "
      f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} max {r['max_ms']:.2f}")
EOF
fi
if [ "$WHAT" = subscribe ] || [ "$WHAT" = all ]; then
    start_server
    sleep 2
    rss() { awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status"; }
    before=$(rss)
    CALLS="${SIP_SUBSCRIPTIONS:-20000}" run subscribe subscribe_hold.xml $((PORT + 6)) \
        -key user alice -au alice -ap "alice pw" -key presentity bob
    sleep 2
    after=$(rss)
    echo "subscribe: server RSS ${before} kB before, ${after} kB with the subscriptions ($(( (after - before) / 1024 )) MB more)"
fi
