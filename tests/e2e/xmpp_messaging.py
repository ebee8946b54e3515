#!/usr/bin/env python3
"""XMPP message routing checks for Switchboard's end-to-end tests.

Run with the interpreter of ``infra/scripts/python-env.sh`` (it has slixmpp).
Every command prints exactly one JSON line as its last stdout line (logs go to
stderr) and exits 0 when the outcome is the expected one, 1 when it is not, 2
on a usage error. Each run is bounded by ``--timeout`` seconds (default 20),
given before or after the command.

Every client is a real slixmpp ``ClientXMPP``: it connects to --host/--port
(no SRV lookup), does STARTTLS verifying the server's certificate against
--cafile for the JID's domain, authenticates with exactly --mechanism
(default SCRAM-SHA-256), binds a server-chosen resource, sends initial
presence (RFC 6121 §4.2) and then does one IQ round trip to the server (a
XEP-0199 ping; any reply, even an error, will do: it shows the server has
processed the presence, since a stream's stanzas are handled in order). It
never asks for the roster. At the end the stream is closed politely. Every
JSON line that got past login has "ping" (the server's answer: "result",
"error:<condition>" or "no-reply"). A login failure gives "error" (a SASL
condition such as "not-authorized", "connection-failed",
"tls-verification-failed", "mechanism-unusable", "stream-error:<cond>",
"timeout"), "stage" ("<a|b>:<connect|negotiate|auth|bind|session>") and
"detail". (Prosody 0.12, for instance, offers no SCRAM-SHA-256: use
--mechanism SCRAM-SHA-1 there.)

Commands
--------
chat
    Logs in --a and --b at once (two clients in one asyncio loop). After
    --settle seconds, A sends a <message type='chat'> with a unique body and
    id to B's bare JID; B must receive it with 'from' = A's full JID and the
    same body. Then B sends a reply (new body and id) to A's full JID; A must
    receive it with 'from' = B's full JID.
      {"ok": true, "a_to_b": true, "b_to_a": true,
       "from_seen": "alice@example.com/abc", "elapsed_ms": 35, ...}
    "from_seen" is the 'from' of A's message as B got it (null if it never
    came); "elapsed_ms" is the time from A's send to A getting the reply (or
    giving up). Also: "a_jid", "b_jid" (bound full JIDs), "reply_from_seen",
    "a_to_b_delayed" (B's copy carried a XEP-0203 delay), "a_errors" /
    "b_errors" (conditions of <message type='error'/> answers to the sender,
    if any), and on failure "error", "stage" and "detail".

send
    Logs in --a, sends one chat message (--body, default a unique text; --id,
    default a unique id) to --to, waits --linger seconds (default 1) and
    disconnects. "ok" is false when the login failed or a <message
    type='error'/> answered the message within the wait.
      {"ok": true, "id": "msg-...", "jid": "alice@example.com/abc", "body": "..."}

receive
    Logs in --b and waits (up to the time left of --timeout, minus a few
    seconds to close) for a message whose body is --expect-body.
      {"ok": true, "from": "alice@example.com/abc", "delay": true,
       "logged_in": true, "received": true, "jid": "carol@example.com/xyz",
       "id": "msg-...", "type": "chat", "delay_from": "example.com",
       "stamp": "2025-...Z", "others": [...]}
    "delay" is whether the message had a XEP-0203 <delay xmlns='urn:xmpp:delay'/>;
    with --expect-delay, "ok" needs it too. "logged_in" and "received" tell a
    message that never came (logged_in true, received false, "error":
    "not-received") from a login that failed. "others" lists the bodies of the
    other messages received.

Examples
--------
  python xmpp_messaging.py chat --host 127.0.0.1 --port 5222 --cafile data/tls/cert.pem \\
      --a alice@example.com --a-password pa --b bob@example.com --b-password pb
  python xmpp_messaging.py send --port 5222 --cafile cert.pem \\
      --a alice@example.com --a-password pa --to carol@example.com --body hello
  python xmpp_messaging.py --timeout 8 receive --port 5222 --cafile cert.pem \\
      --b carol@example.com --b-password pc --expect-body hello --expect-delay
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import time
import uuid
from typing import Any, Callable

NS_DELAY = "urn:xmpp:delay"
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")
CLOSE_MARGIN = 3.0  # seconds kept at the end of a run to close the streams

log = logging.getLogger("xmpp_messaging")

# ---------------------------------------------------------------------------
# Output: exactly one JSON line, whatever happens.

_printed = False


def emit(result: dict[str, Any]) -> None:
    global _printed
    if _printed:
        return
    _printed = True
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def install_backstop(seconds: float, command: str) -> None:
    """A hard limit that holds even if the event loop is stuck."""

    def expired(_signum, _frame):
        emit({"ok": False, "error": "timeout", "stage": "hard-timeout",
              "command": command, "detail": f"no outcome within {seconds:.0f} s"})
        os._exit(1)

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def tls_context(cafile: str) -> ssl.SSLContext:
    """Verifies the server against `cafile` only (not the system store)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# ---------------------------------------------------------------------------
# One logged-in client


class LoginError(Exception):
    def __init__(self, who: str, error: str, stage: str, detail: str | None = None) -> None:
        super().__init__(f"{who}: {error} at {stage}" + (f" ({detail})" if detail else ""))
        self.who, self.error, self.stage, self.detail = who, error, stage, detail

    def fields(self) -> dict[str, Any]:
        result = {"error": self.error, "stage": f"{self.who}:{self.stage}"}
        if self.detail:
            result["detail"] = self.detail[:500]
        return result


def describe(msg: Any) -> dict[str, Any]:
    """The parts of a received <message/> the checks look at."""
    delay = msg.xml.find(f"{{{NS_DELAY}}}delay")
    seen: dict[str, Any] = {
        "type": msg["type"],
        "from": str(msg["from"]) or None,
        "to": str(msg["to"]) or None,
        "id": msg["id"] or None,
        "body": msg["body"],
        "delay": delay is not None,
        "delay_from": delay.get("from") if delay is not None else None,
        "stamp": delay.get("stamp") if delay is not None else None,
    }
    if msg["type"] == "error":
        seen["condition"] = msg["error"]["condition"] or "unknown"
    return seen


class Client:
    """A slixmpp client that records every message it gets."""

    def __init__(self, who: str, jid: str, password: str, args: argparse.Namespace) -> None:
        import slixmpp

        self.who = who
        self.args = args
        self.stage = "connect"
        self.inbox: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.ping: str | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sasl_failure: str | None = None

        xmpp = slixmpp.ClientXMPP(jid, password)
        self.xmpp = xmpp
        mechanisms = xmpp.plugin["feature_mechanisms"]
        mechanisms.use_mech = args.mechanism
        mechanisms.use_mechs = {args.mechanism}
        mechanisms.unencrypted_plain = False
        mechanisms.unencrypted_scram = False
        xmpp.enable_direct_tls = False
        xmpp.enable_starttls = True
        xmpp.enable_plaintext = False
        xmpp.ssl_context = tls_context(args.cafile)
        xmpp.whitespace_keepalive = False
        xmpp.register_plugin("xep_0199")  # ping

        xmpp.add_event_handler("connected", lambda _e: self._stage("negotiate"))
        xmpp.add_event_handler("tls_success", lambda _e: self._stage("auth"))
        xmpp.add_event_handler("auth_success", lambda _e: self._stage("bind"))
        xmpp.add_event_handler("connection_failed", self._on_connection_failed)
        xmpp.add_event_handler("ssl_invalid_chain", self._on_invalid_chain)
        xmpp.add_event_handler("failed_auth", self._on_failed_auth)
        xmpp.add_event_handler("failed_all_auth", self._on_failed_all_auth)
        xmpp.add_event_handler("stream_error", self._on_stream_error)
        xmpp.add_event_handler("disconnected", self._on_disconnected)
        xmpp.add_event_handler("session_start", self._on_session_start)
        xmpp.add_event_handler("message", self._on_message)
        xmpp.add_event_handler("message_error", self._on_message_error)

    # -- events

    def _stage(self, stage: str) -> None:
        self.stage = stage

    def _fail(self, error: str, detail: str | None = None) -> None:
        if not self._ready.done():
            self._ready.set_exception(LoginError(self.who, error, self.stage, detail))

    def _on_connection_failed(self, error: Any) -> None:
        self.xmpp.cancel_connection_attempt()
        kind = ("tls-verification-failed" if isinstance(error, ssl.SSLCertVerificationError)
                else "connection-failed")
        self._fail(kind, str(error))

    def _on_invalid_chain(self, error: Any) -> None:
        self._fail("tls-verification-failed", str(error))
        self.xmpp.abort()

    def _on_failed_auth(self, stanza: Any) -> None:
        self._sasl_failure = stanza["condition"] or "unknown"

    def _on_failed_all_auth(self, _event: Any) -> None:
        offered = sorted(self.xmpp.plugin["feature_mechanisms"].mech_list or [])
        if self._sasl_failure:
            self._fail(self._sasl_failure, "SASL failure")
        else:
            self._fail("mechanism-unusable", f"{self.args.mechanism} not usable; offered {offered}")

    def _on_stream_error(self, error: Any) -> None:
        self._fail("stream-error:" + (error["condition"] or "unknown"), error["text"] or None)

    def _on_disconnected(self, reason: Any) -> None:
        if isinstance(reason, ssl.SSLCertVerificationError):
            self._fail("tls-verification-failed", str(reason))
        elif self._sasl_failure:
            self._fail(self._sasl_failure, "SASL failure")
        else:
            self._fail("disconnected", str(reason) if reason else None)

    def _on_session_start(self, _event: Any) -> None:
        self.stage = "session"
        if not self._ready.done():
            self._ready.set_result(None)

    def _on_message(self, msg: Any) -> None:
        # Messages with a <body/>; an error that echoes the body is also a
        # message_error, recorded there.
        if msg["type"] != "error":
            self._record(msg)

    def _on_message_error(self, msg: Any) -> None:
        self._record(msg)

    def _record(self, msg: Any) -> None:
        seen = describe(msg)
        log.info("%s got %s", self.who, seen)
        self.inbox.append(seen)
        self.arrived.set()

    # -- actions

    @property
    def jid(self) -> str:
        return self.xmpp.boundjid.full

    async def start(self, deadline: float) -> None:
        """Connects, logs in, sends initial presence, pings the server."""
        import slixmpp

        self.xmpp.connect(self.args.host, self.args.port)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout=max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self._fail("timeout", "no session within the time limit")
            await self._ready  # raises the LoginError
        bound = self.xmpp.boundjid
        if not bound.resource:
            raise LoginError(self.who, "bind-failed", "session", bound.full or None)
        self.stage = "presence"
        self.xmpp.send_presence()
        iq = self.xmpp.Iq()
        iq["type"] = "get"
        iq["to"] = bound.domain
        iq.enable("ping")
        try:
            reply = await iq.send(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            self.ping = "result" if reply["type"] == "result" else "error"
        except slixmpp.exceptions.IqError as e:
            self.ping = "error:" + (e.iq["error"]["condition"] or "unknown")
        except slixmpp.exceptions.IqTimeout:
            self.ping = "no-reply"
        self.stage = "ready"

    def send_chat(self, to: str, body: str, msg_id: str) -> None:
        msg = self.xmpp.make_message(mto=to, mbody=body, mtype="chat")
        msg["id"] = msg_id
        msg.send()
        log.info("%s sent %s to %s: %r", self.who, msg_id, to, body)

    async def wait_for(self, match: Callable[[dict[str, Any]], bool],
                       deadline: float) -> dict[str, Any] | None:
        """The first recorded message that matches, waiting until `deadline`."""
        while True:
            for seen in self.inbox:
                if match(seen):
                    return seen
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass

    def errors_for(self, msg_id: str) -> list[str]:
        return [m.get("condition", "unknown") for m in self.inbox
                if m["type"] == "error" and m["id"] == msg_id]

    async def close(self) -> None:
        """Closes the stream (RFC 6120 §4.4), then the connection."""
        xmpp = self.xmpp
        xmpp.cancel_connection_attempt()
        if xmpp.transport is not None:
            try:
                await asyncio.wait_for(xmpp.disconnect(wait=2), timeout=3)
            except Exception:  # noqa: BLE001 - closing is best effort
                xmpp.abort()


async def close_all(clients: list[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------------------
# Commands


async def run_chat(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False, "a_to_b": False, "b_to_a": False,
                              "from_seen": None, "elapsed_ms": None}
    a = Client("a", args.a, args.a_password, args)
    b = Client("b", args.b, args.b_password, args)
    try:
        if not await start_all([a, b], result, args.deadline - CLOSE_MARGIN - 2):
            return result
        result.update({"a_jid": a.jid, "b_jid": b.jid, "ping": [a.ping, b.ping]})
        if args.settle > 0:
            await asyncio.sleep(args.settle)

        # A -> B's bare JID
        token = uuid.uuid4().hex[:16]
        body1, id1 = f"hello b from a {token}", f"chat-a-{token}"
        started = time.monotonic()
        a.send_chat(b.xmpp.boundjid.bare, body1, id1)
        half = started + max(1.0, (args.deadline - CLOSE_MARGIN - started) / 2)
        got = await b.wait_for(lambda m: m["type"] != "error" and m["body"] == body1, half)
        if got is not None:
            result["from_seen"] = got["from"]
            result["a_to_b_delayed"] = got["delay"]
            result["a_to_b"] = got["from"] == a.jid
            if not result["a_to_b"]:
                result.update({"error": "wrong-from", "stage": "a_to_b",
                               "detail": f"B got A's message from {got['from']!r}, not {a.jid!r}"})
        else:
            result.update({"error": "not-received", "stage": "a_to_b",
                           "detail": f"B did not get A's message {id1} within "
                                     f"{half - started:.1f} s"})
        if a.errors_for(id1):
            result["a_errors"] = a.errors_for(id1)

        # B -> A's full JID
        body2, id2 = f"hello a from b {token}", f"chat-b-{token}"
        b.send_chat(a.jid, body2, id2)
        got = await a.wait_for(lambda m: m["type"] != "error" and m["body"] == body2,
                               args.deadline - CLOSE_MARGIN)
        result["elapsed_ms"] = round((time.monotonic() - started) * 1000)
        if got is not None:
            result["reply_from_seen"] = got["from"]
            result["b_to_a"] = got["from"] == b.jid
            if not result["b_to_a"] and "error" not in result:
                result.update({"error": "wrong-from", "stage": "b_to_a",
                               "detail": f"A got B's reply from {got['from']!r}, not {b.jid!r}"})
        elif "error" not in result:
            result.update({"error": "not-received", "stage": "b_to_a",
                           "detail": f"A did not get B's reply {id2}"})
        if b.errors_for(id2):
            result["b_errors"] = b.errors_for(id2)
        result["ok"] = result["a_to_b"] and result["b_to_a"]
        return result
    finally:
        await close_all([a, b])


async def run_send(args: argparse.Namespace) -> dict[str, Any]:
    msg_id = args.id or unique("msg")
    body = args.body if args.body is not None else unique("body")
    result: dict[str, Any] = {"ok": False, "id": msg_id, "body": body}
    a = Client("a", args.a, args.a_password, args)
    try:
        await a.start(args.deadline - CLOSE_MARGIN - args.linger)
        result.update({"jid": a.jid, "ping": a.ping})
        a.send_chat(args.to, body, msg_id)
        await asyncio.sleep(args.linger)
        errors = a.errors_for(msg_id)
        if errors:
            result.update({"error": "message-error", "conditions": errors})
        else:
            result["ok"] = True
    except LoginError as e:
        result.update(e.fields())
    finally:
        await a.close()
    return result


async def run_receive(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False, "from": None, "delay": False, "logged_in": False,
                              "received": False}
    b = Client("b", args.b, args.b_password, args)
    try:
        await b.start(args.deadline - CLOSE_MARGIN - 1)
        result.update({"logged_in": True, "jid": b.jid, "ping": b.ping})
        got = await b.wait_for(lambda m: m["type"] != "error" and m["body"] == args.expect_body,
                               args.deadline - CLOSE_MARGIN)
        result["others"] = [m["body"] for m in b.inbox
                            if m is not got and m["type"] != "error"][:20]
        if got is None:
            result.update({"error": "not-received",
                           "detail": "no message with the expected body"})
            return result
        result.update({"received": True, "from": got["from"], "id": got["id"], "type": got["type"],
                       "delay": got["delay"], "delay_from": got["delay_from"],
                       "stamp": got["stamp"]})
        if args.expect_delay and not got["delay"]:
            result.update({"error": "no-delay",
                           "detail": "the message has no <delay xmlns='urn:xmpp:delay'/>"})
        else:
            result["ok"] = True
    except LoginError as e:
        result.update(e.fields())
    finally:
        await b.close()
    return result


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each command prints one JSON line; see the module docstring.")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="hard limit for the whole run, seconds (default 20)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True, help="STARTTLS (c2s) port")
        p.add_argument("--cafile", required=True, help="PEM certificate(s) to trust")
        p.add_argument("--mechanism", choices=MECHANISMS, default="SCRAM-SHA-256")
        p.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                       help="as the global --timeout")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)

    chat = sub.add_parser("chat", help="A and B exchange chat messages")
    common(chat)
    chat.add_argument("--a", required=True, metavar="JID")
    chat.add_argument("--a-password", required=True)
    chat.add_argument("--b", required=True, metavar="JID")
    chat.add_argument("--b-password", required=True)
    chat.add_argument("--settle", type=float, default=0.5,
                      help="seconds between both being online and A's message (default 0.5)")

    send = sub.add_parser("send", help="A sends one chat message")
    common(send)
    send.add_argument("--a", required=True, metavar="JID")
    send.add_argument("--a-password", required=True)
    send.add_argument("--to", required=True, metavar="JID")
    send.add_argument("--body", help="message body (default: a unique text)")
    send.add_argument("--id", help="message id (default: a unique id)")
    send.add_argument("--linger", type=float, default=1.0,
                      help="seconds to stay online after sending (default 1)")

    receive = sub.add_parser("receive", help="B waits for a message with a given body")
    common(receive)
    receive.add_argument("--b", required=True, metavar="JID")
    receive.add_argument("--b-password", required=True)
    receive.add_argument("--expect-body", required=True)
    receive.add_argument("--expect-delay", action="store_true",
                         help="the message must carry a XEP-0203 delay")
    return parser


def run_cli(parser: argparse.ArgumentParser,
            runners: dict[str, Callable[[argparse.Namespace], Any]],
            argv: list[str] | None = None) -> int:
    """Parses the command line, runs the command's coroutine within
    --timeout and prints its one JSON line; the exit code says whether the
    outcome is the expected one."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.CRITICAL,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.timeout < CLOSE_MARGIN + 2:
        print(f"error: --timeout must be at least {CLOSE_MARGIN + 2:.0f} s", file=sys.stderr)
        return 2
    args.deadline = time.monotonic() + args.timeout
    install_backstop(args.timeout, args.command)
    runner = runners[args.command]

    async def bounded() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(runner(args), timeout=max(1.0, args.timeout - 0.5))
        except asyncio.TimeoutError:
            return {"ok": False, "error": "timeout", "stage": args.command}

    try:
        result = asyncio.run(bounded())
    except Exception as e:  # noqa: BLE001 - report, don't traceback
        log.debug("internal error", exc_info=True)
        result = {"ok": False, "error": "internal", "detail": f"{type(e).__name__}: {e}"}
    signal.setitimer(signal.ITIMER_REAL, 0)
    emit(result)
    return 0 if result.get("ok") else 1


async def start_all(clients: list[Client], result: dict[str, Any], deadline: float,
                    start: Callable[[Client, float], Any] | None = None) -> bool:
    """Logs all `clients` in at once; on a login failure records it in
    `result` and returns False."""
    outcomes = await asyncio.gather(
        *((start(c, deadline) if start else c.start(deadline)) for c in clients),
        return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, LoginError):
            result.update(outcome.fields())
            return False
        if isinstance(outcome, BaseException):
            raise outcome
    return True


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(),
                   {"chat": run_chat, "send": run_send, "receive": run_receive}, argv)


if __name__ == "__main__":
    sys.exit(main())
