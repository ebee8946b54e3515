#!/usr/bin/env python3
"""The receiving SIP device of `benches/sip-load.sh message`: answers every
request on a UDP port with 200 OK (RFC 3428 §7: the UAS answers a MESSAGE
with a final response) and times each MESSAGE from its sender to here.

The sender (SIPp, `benches/sip/message_timed.xml`) ends each body with
`sent=[timestamp]`, which SIPp expands to its wall clock ("date<TAB>time<TAB>
epoch.microseconds"); both programs run on this machine, so receive time
minus that stamp is the SIP→SIP delivery latency: the sender's MESSAGE, the
server's 401, the authenticated MESSAGE, storage on the bus, the router, the
`deliveries` topic and the server's MESSAGE to this device.

    sip_receiver.py PORT OUT_JSON

Runs until SIGTERM, then writes {"received", "p50_ms", "p99_ms", "max_ms"}
to OUT_JSON.
"""

import json
import signal
import socket
import sys
import time


def answer(request: bytes) -> bytes:
    """200 OK with the request's Via, From, To (with a tag), Call-ID, CSeq."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = []
    for line in head[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"via", b"v", b"from", b"f", b"call-id", b"i", b"cseq"):
            keep.append(line)
        elif name in (b"to", b"t"):
            keep.append(line if b";tag=" in line else line + b";tag=bench")
    return b"SIP/2.0 200 OK\r\n" + b"\r\n".join(keep) + b"\r\nContent-Length: 0\r\n\r\n"


def main() -> int:
    port, out = int(sys.argv[1]), sys.argv[2]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.5)
    latencies: list[float] = []
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        try:
            data, peer = sock.recvfrom(65536)
        except socket.timeout:
            continue
        now = time.time()
        if data.startswith(b"SIP/2.0"):
            continue
        sock.sendto(answer(data), peer)
        if data.startswith(b"MESSAGE "):
            body = data.split(b"\r\n\r\n", 1)[-1]
            marker = body.rfind(b"sent=")
            if marker >= 0:
                try:
                    sent = float(body[marker + 5:].split()[-1])
                except (ValueError, IndexError):
                    continue
                latencies.append((now - sent) * 1000.0)
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    with open(out, "w") as f:
        json.dump({"received": len(latencies), "p50_ms": q(0.5), "p99_ms": q(0.99),
                   "max_ms": latencies[-1] if latencies else float("nan")}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
